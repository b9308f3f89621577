"""Pruning benchmark: every registered method on the MNIST-1D MLP and CNN and the digits CNN (not a test).

    .venv/bin/python -m benchmarks.bench_pruning run --out var/bench/pruning.jsonl      # the grid (JSON lines)
    .venv/bin/python -m benchmarks.bench_pruning speed --out var/bench/pruning_speed.json
    .venv/bin/python -m benchmarks.bench_pruning report --results var/bench/pruning.jsonl \
        --speed var/bench/pruning_speed.json --figures docs/figures                     # tables + PNG plots

`run` appends one JSON line per (model, seed, method, keep, reweight, budget) and skips lines already present,
so an interrupted run resumes. Everything is measured on this machine, single-threaded.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import done_keys
from models.data import Splits, load_dataset
from models.dense import default_spec
from models.evaluation import accuracy, output_deviation, predict_logits
from models.flops import count_flops
from models.networks import Classifier, build_network
from models.pruning import list_methods, prune
from models.pruning.greedy import greedy_select, naive_greedy_select, problem_grams
from models.pruning.pipeline import calibration_from
from models.pruning.surgery import layer_inputs, layer_problem
from models.training import TrainConfig, train_classifier

__all__ = ["main"]

MODELS = {"mnist1d-mlp": ("mnist1d", "mlp"), "mnist1d-cnn": ("mnist1d", "cnn1d"), "digits-cnn": ("digits", "cnn2d")}
KEEPS = (0.5, 0.25, 0.1, 0.05)
MNIST1D_SAMPLES = 10_000  # reduced from the default 52,000: 2 shared CPU cores


def _splits(dataset: str, seed: int) -> Splits:
    return load_dataset(dataset, seed=seed, num_samples=MNIST1D_SAMPLES, cache_dir=Path("var/bench/data"))


def trained_dense(model_name: str, seed: int, cache: Path) -> tuple[Classifier, Splits]:
    dataset, kind = MODELS[model_name]
    splits = _splits(dataset, seed)
    path = cache / f"{model_name}-s{seed}.pt"
    model = build_network(default_spec(splits, kind))
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        torch.manual_seed(seed)
        train_classifier(
            model, splits.x_train, splits.y_train, splits.x_val, splits.y_val, TrainConfig(seed=seed, progress=False)
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval(), splits


@torch.no_grad()
def latency_ratio(model: Classifier, dense: Classifier, batch: int, reps: int) -> tuple[float, float]:
    """Median seconds per forward of `model`, and its ratio to the dense model's, measured interleaved."""
    x = torch.randn(batch, dense.spec.input_dim)
    for _ in range(3):
        model(x), dense(x)
    times_m, times_d = [], []
    for _ in range(reps):
        t = time.perf_counter()
        model(x)
        times_m.append(time.perf_counter() - t)
        t = time.perf_counter()
        dense(x)
        times_d.append(time.perf_counter() - t)
    m, d = statistics.median(times_m), statistics.median(times_d)
    return m, m / d


def _loss(model: Classifier, splits: Splits) -> float:
    logits = predict_logits(model, splits.x_test)
    return float(F.cross_entropy(logits, torch.as_tensor(splits.y_test)))


def _configs(methods: list[str]) -> list[tuple[str, bool, str]]:
    out = []
    for m in list_methods():
        if methods and m.name not in methods:
            continue
        if m.kind == "unstructured":
            out.append((m.name, False, "uniform"))
        else:
            out += [(m.name, False, "uniform"), (m.name, True, "uniform")]
            if m.name == "greedy-layer":
                out.append((m.name, True, "equal-error"))
    return out


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_keys(out, ("model", "seed", "method", "keep", "reweight", "budget"))
    for model_name in args.models:
        for seed in args.seeds:
            dense, splits = trained_dense(model_name, seed, Path(args.cache))
            cal = calibration_from(splits, args.calibration_size, seed)
            dense_flops = count_flops(dense, dense.spec.input_dim).dense_kernel
            dense_acc = accuracy(dense, splits.x_test, splits.y_test)
            for keep in args.keeps:
                for method, reweight, budget in _configs(args.methods):
                    key = (model_name, seed, method, keep, reweight, budget)
                    if key in done:
                        continue
                    torch.manual_seed(seed)
                    t = time.perf_counter()
                    pruned = prune(dense, method, keep, cal, reweight=reweight, budget=budget)  # type: ignore[arg-type]
                    prune_s = time.perf_counter() - t
                    flops = count_flops(pruned, dense.spec.input_dim)
                    dev = output_deviation(pruned, dense, splits.x_test)
                    _, lat1 = latency_ratio(pruned, dense, 1, args.reps_1)
                    _, lat1024 = latency_ratio(pruned, dense, 1024, args.reps_1024)
                    record: dict[str, Any] = {
                        "model": model_name,
                        "seed": seed,
                        "method": method,
                        "kind": "structured" if pruned.spec != dense.spec else "unstructured",
                        "keep": keep,
                        "reweight": reweight,
                        "budget": budget,
                        "dense_accuracy": dense_acc,
                        "accuracy": accuracy(pruned, splits.x_test, splits.y_test),
                        "loss": _loss(pruned, splits),
                        "dense_loss": _loss(dense, splits),
                        "deviation_mean": dev[0],
                        "deviation_p95": dev[1],
                        "flops_dense_kernel": flops.dense_kernel,
                        "flops_nonzero": flops.nonzero,
                        "dense_flops": dense_flops,
                        "latency_ratio_b1": lat1,
                        "latency_ratio_b1024": lat1024,
                        "widths": pruned.spec.widths,
                        "prune_seconds": prune_s,
                        "calibration_size": args.calibration_size,
                    }
                    if args.finetune_epochs > 0:
                        tuned = copy.deepcopy(pruned)
                        config = TrainConfig(
                            epochs=args.finetune_epochs, patience=args.finetune_epochs, seed=seed, progress=False
                        )
                        train_classifier(tuned, splits.x_train, splits.y_train, splits.x_val, splits.y_val, config)
                        record["accuracy_finetuned"] = accuracy(tuned, splits.x_test, splits.y_test)
                    with out.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    print(
                        f"{model_name} s{seed} {method:26s} rw={int(reweight)} {budget:11s} keep={keep:<5} "
                        f"acc={record['accuracy']:.3f} ft={record.get('accuracy_finetuned', float('nan')):.3f} "
                        f"dev={dev[0]:.3f} ({prune_s:.1f}s)",
                        flush=True,
                    )


def speed(args: argparse.Namespace) -> None:
    """Greedy timing on a 256-to-256 layer with 512 samples; structured speedup vs FLOPs reduction."""
    torch.set_num_threads(1)
    dense, splits = trained_dense("mnist1d-mlp", 0, Path(args.cache))
    cal = calibration_from(splits, 512, 0)
    x = cal.x.float()
    problem_256 = layer_problem(dense, 0, layer_inputs(dense, x)[1])  # 256 units feeding a 256-unit layer
    B = problem_256.A @ problem_256.W.T
    result: dict[str, Any] = {"layer": "mnist1d-mlp hidden 1 (256 units) -> hidden 2 (256 units)", "samples": len(x)}
    for k in (128, 26):
        t = time.perf_counter()
        G, C, total = problem_grams(problem_256.A, B)
        greedy_select(G, C, k, 1, total)
        result[f"greedy_seconds_k{k}"] = time.perf_counter() - t
    k_naive = 8
    t = time.perf_counter()
    G, C, total = problem_grams(problem_256.A, B)
    fast = greedy_select(G, C, k_naive, 1, total).order
    fast_s = time.perf_counter() - t
    t = time.perf_counter()
    slow = naive_greedy_select(problem_256.A, B, k_naive, 1)
    slow_s = time.perf_counter() - t
    result.update(
        naive_k=k_naive,
        incremental_seconds_k8=fast_s,
        naive_seconds_k8=slow_s,
        naive_over_incremental=slow_s / fast_s,
        same_selection=fast.tolist() == slow.tolist(),
    )
    rows = []
    for model_name in ("mnist1d-mlp", "mnist1d-cnn", "digits-cnn"):
        d, s = trained_dense(model_name, 0, Path(args.cache))
        c = calibration_from(s, 512, 0)
        dense_flops = count_flops(d, d.spec.input_dim).dense_kernel
        for keep in KEEPS:
            p = prune(d, "greedy-layer", keep, c, reweight=True)
            f = count_flops(p, d.spec.input_dim).dense_kernel
            _, r1024 = latency_ratio(p, d, 1024, args.reps_1024 * 3)
            _, r1 = latency_ratio(p, d, 1, args.reps_1 * 3)
            rows.append(
                {
                    "model": model_name,
                    "keep": keep,
                    "flops_reduction": dense_flops / f,
                    "speedup_b1024": 1 / r1024,
                    "speedup_b1": 1 / r1,
                    "speedup_over_flops_reduction_b1024": (1 / r1024) / (dense_flops / f),
                }
            )
            print(rows[-1], flush=True)
    result["structured_speedup"] = rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def claims(args: argparse.Namespace) -> None:
    """Paper 003's claim (test loss right after pruning: elimination-compensation vs magnitude, SNIP, random,
    and vs its own mask without compensation) and the GraSP sign convention, on the MNIST-1D MLP."""
    from models.pruning import apply_masks, select_masks
    from models.pruning.elimination import score_elimination_compensation
    from models.pruning.unstructured import score_grasp

    torch.set_num_threads(1)
    out: list[dict[str, Any]] = []
    for seed in args.seeds:
        dense, splits = trained_dense("mnist1d-mlp", seed, Path(args.cache))
        cal = calibration_from(splits, 512, seed)
        for scope in ("global", "layer"):
            for keep in KEEPS:
                row: dict[str, Any] = {"seed": seed, "scope": scope, "keep": keep}
                for method in ("elimination-compensation", "magnitude", "snip", "random"):
                    torch.manual_seed(seed)
                    p = prune(dense, method, keep, cal, scope=scope)  # type: ignore[arg-type]
                    row[f"loss_{method}"] = _loss(p, splits)
                    row[f"acc_{method}"] = accuracy(p, splits.x_test, splits.y_test)
                ec_mask = select_masks(score_elimination_compensation(dense, cal), keep, scope)  # type: ignore[arg-type]
                plain = apply_masks(copy.deepcopy(dense), ec_mask)
                row["loss_ec_without_compensation"] = _loss(plain, splits)
                row["acc_ec_without_compensation"] = accuracy(plain, splits.x_test, splits.y_test)
                flipped = {k: -v for k, v in score_grasp(copy.deepcopy(dense), cal).items()}
                g = apply_masks(copy.deepcopy(dense), select_masks(flipped, keep, scope))  # type: ignore[arg-type]
                torch.manual_seed(seed)
                row["acc_grasp_notes_sign"] = accuracy(
                    prune(dense, "grasp", keep, cal, scope=scope),  # type: ignore[arg-type]
                    splits.x_test,
                    splits.y_test,
                )
                row["acc_grasp_paper_sign"] = accuracy(g, splits.x_test, splits.y_test)
                out.append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(json.dumps(r) for r in out) + "\n")


def _label(r: dict[str, Any]) -> str:
    label = r["method"]
    if r["reweight"]:
        label += " +rw"
    if r["budget"] != "uniform":
        label += f" ({r['budget']})"
    return label


def _plot(
    plt: Any, groups: dict, model: str, labels: list[str], keeps: list[float], dense_acc: float, figures: Path
) -> None:
    """Unstructured methods in one panel; structured without and with reweighting side by side."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 5), sharey=True)
    for ax in axes:
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for lab in labels:
        rs_all = [groups[(model, lab, k)] for k in keeps if (model, lab, k) in groups]
        kind = rs_all[0][0]["kind"]
        ax = axes[0] if kind == "unstructured" else axes[2] if "+rw" in lab else axes[1]
        ks = [rs[0]["keep"] for rs in rs_all]
        acc = [np.mean([r["accuracy"] for r in rs]) for rs in rs_all]
        err = [np.std([r["accuracy"] for r in rs]) for rs in rs_all]
        style = "-" if lab.startswith("greedy") or lab.startswith("elimination") else "--"
        ax.errorbar(ks, acc, yerr=err, marker="o", linestyle=style, capsize=2, label=lab)
    titles = ["unstructured (kept fraction of weights)", "structured, no reweighting", "structured + reweighting"]
    for ax, title in zip(axes, titles, strict=True):
        ax.axhline(dense_acc, color="k", linewidth=0.8, label="dense")
        ax.set_xscale("log")
        ax.set_xlabel("kept fraction")
        ax.set_title(title)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("test accuracy right after pruning (mean +- std over seeds)")
    fig.suptitle(f"{model}: no fine-tuning, 512 calibration samples")
    fig.tight_layout()
    fig.savefig(figures / f"pruning_{model}.png", dpi=100)
    plt.close(fig)


def _claims_table(rows: list[dict[str, Any]]) -> list[str]:
    keys = [
        "loss_elimination-compensation",
        "loss_ec_without_compensation",
        "loss_magnitude",
        "loss_snip",
        "loss_random",
        "acc_grasp_notes_sign",
        "acc_grasp_paper_sign",
    ]
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["scope"], r["keep"])].append(r)
    lines = [
        f"### claims: mnist1d-mlp, test loss right after pruning (seeds {sorted({r['seed'] for r in rows})})",
        "",
        "| scope | kept | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
        "|---" * (len(keys) + 2) + "|",
    ]
    for (scope, keep), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        vals = [f"{np.mean([r[k] for r in rs]):.3f}±{np.std([r[k] for r in rs]):.3f}" for k in keys]
        lines.append(f"| {scope} | {keep} | " + " | ".join(vals) + " |")
    return [*lines, ""]


def headline(rows: list[dict[str, Any]]) -> list[str]:
    """Compact table: greedy variants (+ reweighting) against the best baseline, no fine-tuning."""
    g: dict[tuple[str, float, str], list[float]] = defaultdict(list)
    ft: dict[tuple[str, float, str], list[float]] = defaultdict(list)
    flops: dict[tuple[str, float, str], list[float]] = defaultdict(list)
    for r in rows:
        g[(r["model"], r["keep"], _label(r))].append(r["accuracy"])
        ft[(r["model"], r["keep"], _label(r))].append(r.get("accuracy_finetuned", float("nan")))
        flops[(r["model"], r["keep"], _label(r))].append(r["flops_dense_kernel"] / r["dense_flops"])

    def m(d: dict, key: tuple) -> str:
        return f"{np.mean(d[key]):.3f}" if key in d else "-"

    lines = [
        "| model | kept | FLOPs (uniform) | greedy-layer +rw | greedy-seq +rw | greedy-asym +rw | greedy-layer +rw "
        "(equal-error) | best other +rw | best other, no rw | greedy-layer +rw, 2 ep FT | magnitude | "
        "elimination-compensation |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in sorted({r["model"] for r in rows}):
        for keep in sorted({r["keep"] for r in rows}, reverse=True):
            labs = {lab for (mm, k, lab) in g if mm == model and k == keep}
            others_rw = [lab for lab in labs if lab.endswith("+rw") and not lab.startswith("greedy")]
            others = [lab for lab in labs if "+rw" not in lab and not lab.startswith("greedy") and "layer" in lab]
            others += [lab for lab in labs if lab in ("act-grad", "random-channel")]
            best_rw = max(others_rw, key=lambda lab: np.mean(g[(model, keep, lab)]))
            best = max(others, key=lambda lab: np.mean(g[(model, keep, lab)]))
            k = (model, keep)
            lines.append(
                f"| {model} | {keep} | {m(flops, (*k, 'greedy-layer +rw'))} | {m(g, (*k, 'greedy-layer +rw'))} "
                f"| {m(g, (*k, 'greedy-sequential +rw'))} | {m(g, (*k, 'greedy-asymmetric +rw'))} "
                f"| {m(g, (*k, 'greedy-layer +rw (equal-error)'))} | {best_rw} {m(g, (*k, best_rw))} "
                f"| {best} {m(g, (*k, best))} | {m(ft, (*k, 'greedy-layer +rw'))} | {m(g, (*k, 'magnitude'))} "
                f"| {m(g, (*k, 'elimination-compensation'))} |"
            )
    return lines


def report(args: argparse.Namespace) -> None:
    """Markdown tables (mean +- std over seeds) and accuracy-vs-kept-fraction plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines()]
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["model"], _label(r), r["keep"])].append(r)
    models = sorted({r["model"] for r in rows})
    keeps = sorted({r["keep"] for r in rows}, reverse=True)
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    lines: list[str] = ["### headline (test accuracy right after pruning, mean over seeds)", "", *headline(rows), ""]

    def stat(rs: list[dict[str, Any]], key: str, fmt: str = ".3f") -> str:
        vals = [r[key] for r in rs if key in r]
        if not vals:
            return "-"
        if len(vals) == 1:
            return format(vals[0], fmt)
        return f"{np.mean(vals):{fmt}}±{np.std(vals):{fmt}}"

    for model in models:
        labels = sorted({lab for (m, lab, _) in groups if m == model})
        dense_acc = np.mean([r["dense_accuracy"] for r in rows if r["model"] == model])
        seeds = sorted({r["seed"] for r in rows if r["model"] == model})
        lines += [f"### {model} (dense accuracy {dense_acc:.3f}, seeds {seeds})", ""]
        for keep in keeps:
            lines += [
                f"kept fraction {keep}:",
                "",
                "| method | acc | acc after FT | test loss | rel. dev. mean | rel. dev. p95 | FLOPs (kernel / nonzero) "
                "| latency b1 | latency b1024 |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for lab in labels:
                rs = groups.get((model, lab, keep), [])
                if not rs:
                    continue
                fr = np.mean([r["flops_dense_kernel"] / r["dense_flops"] for r in rs])
                fn = np.mean([r["flops_nonzero"] / r["dense_flops"] for r in rs])
                lines.append(
                    f"| {lab} | {stat(rs, 'accuracy')} | {stat(rs, 'accuracy_finetuned')} | {stat(rs, 'loss', '.2f')} "
                    f"| {stat(rs, 'deviation_mean', '.2f')} | {stat(rs, 'deviation_p95', '.2f')} "
                    f"| {fr:.3f} / {fn:.3f} | {stat(rs, 'latency_ratio_b1', '.2f')} "
                    f"| {stat(rs, 'latency_ratio_b1024', '.2f')} |"
                )
            lines.append("")
        _plot(plt, groups, model, labels, keeps, dense_acc, figures)
    if args.claims and Path(args.claims).exists():
        lines += _claims_table([json.loads(line) for line in Path(args.claims).read_text().splitlines()])
    if args.speed and Path(args.speed).exists():
        sp = json.loads(Path(args.speed).read_text())
        lines += ["### speed", "", "```json", json.dumps(sp, indent=2), "```", ""]
    text = "\n".join(lines)
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", default="var/bench/pruning.jsonl")
    r.add_argument("--cache", default="var/bench/models")
    r.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--keeps", nargs="+", type=float, default=list(KEEPS))
    r.add_argument("--methods", nargs="*", default=[])
    r.add_argument("--calibration-size", type=int, default=512)
    r.add_argument("--finetune-epochs", type=int, default=2)
    r.add_argument("--reps-1", type=int, default=50)
    r.add_argument("--reps-1024", type=int, default=7)
    r.set_defaults(func=run)
    s = sub.add_parser("speed")
    s.add_argument("--out", default="var/bench/pruning_speed.json")
    s.add_argument("--cache", default="var/bench/models")
    s.add_argument("--reps-1", type=int, default=50)
    s.add_argument("--reps-1024", type=int, default=7)
    s.set_defaults(func=speed)
    c = sub.add_parser("claims")
    c.add_argument("--out", default="var/bench/pruning_claims.jsonl")
    c.add_argument("--cache", default="var/bench/models")
    c.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    c.set_defaults(func=claims)
    p = sub.add_parser("report")
    p.add_argument("--results", default="var/bench/pruning.jsonl")
    p.add_argument("--speed", default="var/bench/pruning_speed.json")
    p.add_argument("--claims", default="var/bench/pruning_claims.jsonl")
    p.add_argument("--figures", default="docs/figures")
    p.add_argument("--markdown", default="")
    p.set_defaults(func=report)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
