"""Do gadgets over pair-model hidden states beat averaging at equal FLOPs, and is there a sweet spot? n-accuracy
and relative information over grades for pair tuples (`lab.pair_tuples`).

Variants: the home's `pair-dense`, `pair-s30`, `pair-s10` (read only: nothing is written to the home) plus
`greedy-asymmetric` with reweighting pruned here at `--keeps`, each without and with a `--finetune-steps`
fine-tune of the scorer (front end frozen, as the bootstrap's variants). Per seed: tuples (training pool for the
gadgets from the pair models' training prototypes, validation pool from unseen prototypes, test tuples from the
served space's prototypes, which no model trained on) and gadget initialisation change; the variants do not.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_pair_gadgets --home /work/home-default \\
        --seeds 0 1 2 --out var/bench/pair-gadgets
    .venv/bin/python -m benchmarks.bench_pair_gadgets --out var/bench/pair-gadgets --summarise

Writes OUT/seed-S/{results.json,results.csv,budget_results.csv,sweet_spots.csv,summary.md} (the formats of
`python -m lab.run_tuples`) and, with --summarise, OUT/summary.md across seeds. A seed whose results.json exists is
skipped (resumable).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

__all__ = ["main", "build_variants", "summarise"]

DENSE_FLOPS_NOTE = "budgets are in dense pair passes (pair-dense's FLOPs per pair as served, folded)"


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_variants(home: Path, keeps: list[float], finetune_steps: int) -> tuple[list, dict]:
    """The registry's pair models and the ones pruned here; returns (variants, context)."""
    import torch

    from lab.pair_tuples import pair_variant
    from models.pair_training import PairTrainConfig, pair_calibration, train_pair_model
    from models.prototypes import PrototypeConfig, make_prototype_set
    from models.pruning.pair import prune_pair
    from models.registry import ModelRegistry

    registry = ModelRegistry(home / "registry")
    dense = registry.load("pair-dense")
    extra = dense.manifest.extra
    train_cfg = PrototypeConfig(**{**extra["prototypes"], "padding": tuple(extra["prototypes"]["padding"])})
    boot = json.loads((home / "bootstrap.json").read_text())
    space = boot["pair"]["space"]
    space_cfg = PrototypeConfig(**{**space, "padding": tuple(space["padding"])})
    prior = tuple(float(p) for p in extra["grade_prior"])
    variants = [pair_variant("pair-dense", "dense", 1.0, dense.model)]
    for name in ("pair-s30", "pair-s10"):
        loaded = registry.load(name)
        m = loaded.manifest
        label = f"{name} (gas {m.keep:g} ft{m.extra.get('finetune_steps', 0)})"
        variants.append(pair_variant(label, m.method, m.keep, loaded.model))
    train_set = make_prototype_set(train_cfg, "train")
    val_set = make_prototype_set(replace(train_cfg, num_prototypes=max(200, train_cfg.num_prototypes // 5)), "val")
    pairs = pair_calibration(train_set, 512, 0)
    for keep in keeps:
        torch.manual_seed(0)
        pruned = prune_pair(dense.model, "greedy-asymmetric", keep, pairs, reweight=True)
        variants.append(pair_variant(f"gas@{keep:g}", "greedy-asymmetric", keep, pruned))
        _log(f"pruned gas@{keep:g}: {variants[-1].flops:,} FLOPs per pair")
        if finetune_steps > 0:
            config = replace(PairTrainConfig(), steps=finetune_steps, seed=0, grade_mix=prior)
            start = copy.deepcopy(pruned)
            tuned, _ = train_pair_model(pruned.spec, train_set, val_set, config, model=start, train_front=False)
            variants.append(pair_variant(f"gas@{keep:g}+ft{finetune_steps}", "greedy-asymmetric+ft", keep, tuned))
            _log(f"fine-tuned gas@{keep:g}")
    return variants, {"train": train_cfg, "space": space_cfg, "prior": prior}


def run_seed(variants: list, ctx: dict, seed: int, args: argparse.Namespace, out: Path) -> None:
    from dataclasses import replace as dc_replace

    from lab.pair_tuples import run_pair_experiment
    from lab.run_tuples import write_outputs
    from models.gadget_training import GadgetTrainConfig
    from models.pair_gadget_training import sample_pair_tuples
    from models.prototypes import make_prototypes

    train_cfg, space_cfg, model_prior = ctx["train"], ctx["space"], ctx["prior"]
    tuple_prior = model_prior if args.prior == "train" else (1 / 3, 1 / 3, 1 / 3)
    n_max = args.n_max
    train_protos = make_prototypes(train_cfg, "train")
    val_cfg = dc_replace(train_cfg, num_prototypes=max(200, train_cfg.num_prototypes // 5), seed=train_cfg.seed + 2000)
    val_protos = make_prototypes(val_cfg, "val")
    test_protos = make_prototypes(space_cfg, "space")
    train = sample_pair_tuples(train_protos, args.train_tuples, n_max, tuple_prior, seed * 3 + 0)
    val = sample_pair_tuples(val_protos, args.val_tuples, n_max, tuple_prior, seed * 3 + 1)
    test = sample_pair_tuples(test_protos, args.tuples, n_max, tuple_prior, seed * 3 + 2)
    for v in variants:
        v.gadgets.clear()
    dense_flops = variants[0].flops
    budgets = [round(b * dense_flops) for b in args.budgets]
    started = time.perf_counter()
    result = run_pair_experiment(
        variants,
        train,
        val,
        test,
        tuple_prior=tuple_prior,
        model_prior=model_prior,
        ns=list(range(1, n_max + 1)),
        budgets=budgets,
        gadget_hidden=args.gadget_hidden,
        gadget_config=GadgetTrainConfig(n_max=n_max, steps=args.gadget_steps, seed=seed),
        log=_log,
    )
    result.config.update(
        seed=seed,
        budgets_in_dense_passes=args.budgets,
        dense_flops_per_pair=dense_flops,
        argv=sys.argv[1:],
        seconds=round(time.perf_counter() - started, 1),
        prior_choice=args.prior,
        note=DENSE_FLOPS_NOTE,
    )
    write_outputs(result, out, plots=False)
    _log(f"seed {seed}: wrote {out} in {result.config['seconds']} s")


def summarise(out: Path) -> str:
    """Tables across seeds: n-accuracy and RI per variant and aggregator at n in {1, 2, 4, 8, 16}, and the sweet
    spot per budget and aggregator in every seed."""
    runs = sorted(out.glob("seed-*/results.json"))
    data = [json.loads(p.read_text()) for p in runs]
    if not data:
        raise SystemExit(f"no seed-*/results.json under {out}")
    seeds = [d["config"]["seed"] for d in data]
    lines = [f"# Pair gadgets: seeds {seeds}, {data[0]['config']['num_tuples']} test tuples per cell", ""]
    lines.append(f"tuple prior {data[0]['config']['tuple_prior']}, model prior {data[0]['config']['model_prior']}")
    lines.append("")
    show = [1, 2, 4, 8, 16]
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for d in data:
        for r in d["rows"]:
            cells[(r["variant"], r["aggregator"], r["n"])].append(r)
    variants = list(dict.fromkeys(r["variant"] for r in data[0]["rows"]))
    aggs = list(dict.fromkeys(r["aggregator"] for r in data[0]["rows"]))
    for metric, title in (("n_accuracy", "n-accuracy"), ("ri", "RI")):
        lines += [f"## {title} at n = {', '.join(map(str, show))} (mean over seeds)", ""]
        lines.append("| variant | acc (1 pair) | FLOPs/pair | " + " | ".join(aggs) + " |")
        lines.append("|---|---|---|" + "---|" * len(aggs))
        for v in variants:
            first = cells[(v, aggs[0], 1)][0]
            acc = sum(r["accuracy"] for r in cells[(v, aggs[0], 1)]) / len(data)
            vals = []
            for a in aggs:
                ms = [sum(r[metric] for r in cells[(v, a, n)]) / len(cells[(v, a, n)]) for n in show]
                vals.append(" ".join(f"{m:.3f}" for m in ms))
            lines.append(f"| {v} | {acc:.4f} | {first['flops_item']:,} | " + " | ".join(vals) + " |")
        lines.append("")
    lines += ["## Aggregator FLOPs per tuple (beyond the n pair passes), first seed", ""]
    lines.append("| variant | aggregator | n=1 | n=4 | n=16 |")
    lines.append("|---|---|---|---|---|")
    for v in variants:
        for a in aggs:
            f = [cells[(v, a, n)][0]["flops_aggregator"] for n in (1, 4, 16)]
            lines.append(f"| {v} | {a} | {f[0]:,} | {f[1]:,} | {f[2]:,} |")
    lines.append("")
    lines += ["## Sweet spot per budget (dense pair passes) and aggregator, every seed", ""]
    lines.append("| budget | aggregator | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    lines.append("|---|---|" + "---|" * len(seeds))
    per: dict[tuple, dict] = defaultdict(dict)
    for d in data:
        passes = dict(zip(d["config"]["budgets"], d["config"]["budgets_in_dense_passes"], strict=True))
        for s in d["sweet_spots"]:
            per[(passes[s["budget"]], s["aggregator"])][d["config"]["seed"]] = s
    for (b, a), by_seed in sorted(per.items(), key=lambda kv: (kv[0][0], aggs.index(kv[0][1]))):
        cols = []
        for s in seeds:
            r = by_seed.get(s)
            cols.append(
                "-"
                if r is None
                else f"{r['variant']} n={r['n']}: {r['n_accuracy']:.4f} [{r['n_accuracy_low']:.4f}, "
                f"{r['n_accuracy_high']:.4f}] RI {r['ri']:.3f}"
            )
        lines.append(f"| {b:g} | {a} | " + " | ".join(cols) + " |")
    lines.append("")
    lines += _budget_curves(data, variants, ("mean_logit", "bayes", "lstm", "deepsets"))
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def faiss_grade_mix(home: Path, ms: list[int]) -> str:
    """The grade mix among stage 0's M candidates for the home's held-out queries (what a first stage sees)."""
    import numpy as np

    from cascade.embedding import EmbeddingIndex
    from cascade.queries import QuerySet, cluster_grades
    from cascade.space import Space

    d = home / "spaces" / "default"
    space, emb, qs = Space.load(d), EmbeddingIndex.load(d), QuerySet.load(d)
    lines = ["| M | grade 0 | grade 1 | grade 2 |", "|---|---|---|---|"]
    for m in ms:
        counts = np.zeros(3)
        for i in range(len(qs)):
            near, _ = emb.candidates(qs.x[i : i + 1], m)
            counts += np.bincount(
                cluster_grades(space.cluster_labels, int(qs.cluster[i]), int(qs.label[i]))[near], minlength=3
            )
        f = counts / counts.sum()
        lines.append(f"| {m} | {f[0]:.4f} | {f[1]:.4f} | {f[2]:.4f} |")
    return f"{len(qs)} held-out queries of {home}\n\n" + "\n".join(lines) + "\n"


def diagnose(variants: list, ctx: dict, seed: int, count: int, n_max: int) -> str:
    """Why does averaging level off? Per true grade, the n-accuracy of `mean_logit` on the study's test tuples
    (one query view shared by all n members, as in a cascade) and on a control where every member is read with
    its own fresh view of the query prototype. Averaging cannot remove noise that all members share."""
    import numpy as np
    import torch

    from models.aggregation import aggregate, log_prior_of
    from models.pair_gadget_training import pair_tuple_outputs_many, sample_pair_tuples
    from models.prototypes import make_prototypes, make_views

    protos = make_prototypes(ctx["space"], "space")
    prior = ctx["prior"]
    tuples = sample_pair_tuples(protos, count, n_max, prior, seed * 3 + 2)
    rng = np.random.default_rng([seed, 77])
    own_q = torch.from_numpy(make_views(protos, np.repeat(tuples.query_ids, n_max), rng))
    models = [v.model for v in variants]
    shared = pair_tuple_outputs_many(models, tuples)
    log_prior = log_prior_of(torch.tensor(prior, dtype=torch.float64))
    lines = ["| variant | query views | grade | n=1 | n=2 | n=4 | n=8 | n=16 |", "|---|---|---|---|---|---|---|---|"]
    with torch.no_grad():
        for v, out in zip(variants, shared, strict=True):
            v.model.eval()
            x = tuples.members.reshape(-1, tuples.members.shape[2])
            logits = torch.cat([v.model(own_q[i : i + 4096], x[i : i + 4096]) for i in range(0, len(x), 4096)]).reshape(
                count, n_max, -1
            )
            for label, lg in (("one, shared", out.logits), ("fresh per member", logits)):
                for g in (0, 1, 2, None):
                    cols = []
                    for n in (1, 2, 4, 8, 16):
                        if n > n_max:
                            cols.append("-")
                            continue
                        counts = torch.full((count,), n, dtype=torch.long)
                        post = aggregate("mean_logit", _members(lg[:, :n]), counts, log_prior)
                        hit = post.argmax(1) == tuples.grades
                        mask = torch.ones_like(hit) if g is None else tuples.grades == g
                        cols.append(f"{float(hit[mask].float().mean()):.3f}")
                    name = "all" if g is None else str(g)
                    lines.append(f"| {v.label} | {label} | {name} | " + " | ".join(cols) + " |")
    return f"seed {seed}, {count} tuples, aggregator mean_logit\n\n" + "\n".join(lines) + "\n"


def _members(logits: Any) -> Any:
    """(T, n, G) logits as contiguous member runs."""
    from models.aggregation import MemberOutputs

    return MemberOutputs(logits.reshape(-1, logits.shape[2]))


def _budget_curves(data: list[dict], variants: list[str], aggs: tuple[str, ...]) -> list[str]:
    """Per budget and aggregator, every variant's n-accuracy at the largest n it affords (mean over seeds, with
    that n): the curve over compression levels whose peak is the sweet spot."""
    lines: list[str] = []
    flops = {r["variant"]: r["flops_item"] for r in data[0]["rows"]}
    order = sorted(variants, key=lambda v: flops[v])
    for agg in aggs:
        lines += [f"## n-accuracy at the largest affordable n (<= 16), `{agg}`, mean over seeds: value (n)", ""]
        lines.append("| budget (dense passes) | " + " | ".join(f"{v} ({flops[v]:,})" for v in order) + " |")
        lines.append("|---|" + "---|" * len(order))
        for b, passes in zip(data[0]["config"]["budgets"], data[0]["config"]["budgets_in_dense_passes"], strict=True):
            cols = []
            for v in order:
                picks = []
                for d in data:
                    fit = [
                        r for r in d["rows"] if r["variant"] == v and r["aggregator"] == agg and r["flops_tuple"] <= b
                    ]
                    if fit:
                        picks.append(max(fit, key=lambda r: r["n"]))
                if len(picks) < len(data):
                    cols.append("-")
                    continue
                mean = sum(r["n_accuracy"] for r in picks) / len(picks)
                ns = sorted({r["n"] for r in picks})
                cols.append(f"{mean:.3f} ({'/'.join(map(str, ns))})")
            top = max((float(c.split()[0]) for c in cols if c != "-"), default=None)
            cols = [f"**{c}**" if c != "-" and top is not None and float(c.split()[0]) == top else c for c in cols]
            lines.append(f"| {passes:g} | " + " | ".join(cols) + " |")
        lines.append("")
    return lines


CASCADES = {
    "default (bayes)": None,
    "mean_logit": [
        {"variant": "pair-s10", "samples": 2, "keep": 40, "aggregator": "mean_logit"},
        {"variant": "pair-s30", "samples": 4, "keep": 10, "aggregator": "mean_logit"},
        {"variant": "pair-dense", "samples": 10, "aggregator": "mean_logit"},
    ],
    "lstm on pair-s10": [
        {"variant": "pair-s10", "samples": 2, "keep": 40, "aggregator": "lstm"},
        {"variant": "pair-s30", "samples": 4, "keep": 10, "aggregator": "bayes"},
        {"variant": "pair-dense", "samples": 10, "aggregator": "bayes"},
    ],
    "lstm on pair-s10, pair-s30": [
        {"variant": "pair-s10", "samples": 2, "keep": 40, "aggregator": "lstm"},
        {"variant": "pair-s30", "samples": 4, "keep": 10, "aggregator": "lstm"},
        {"variant": "pair-dense", "samples": 10, "aggregator": "bayes"},
    ],
}
"""The served cascade (a home's `pair_stages`: pair-s10 n2 keep 40, pair-s30 n4 keep 10, pair-dense n10) with
other aggregators; the lstm ones need `prunecascade gadget --kind lstm` run for pair-s10 and pair-s30 first."""


def cascade_comparison(home: Path, queries: int, candidates: int = 200) -> str:
    """recall@1, recall@10, nDCG@10 and FLOPs of the served cascade with each aggregator choice, on the home's
    held-out queries (no oracle: it would dominate the run time)."""
    from cascade.config import CONFIG_FILE, CascadeConfig, Stage
    from cascade.evaluation import evaluate_example_queries
    from cascade.ranking_metrics import wilson_interval
    from cascade.snapshot import load_snapshot
    from models.registry import ModelRegistry

    snapshot = load_snapshot(
        ModelRegistry(home / "registry"), home / "spaces" / "default", CascadeConfig.load(home / CONFIG_FILE)
    )
    methods = {
        name: None if stages is None else tuple(Stage.model_validate(s) for s in stages)
        for name, stages in CASCADES.items()
    }
    reports = evaluate_example_queries(snapshot, methods, k=10, candidates=candidates, queries=queries, oracle=False)
    lines = [
        f"{queries} held-out queries of {home}, k = 10, M = {candidates}; member sampling seeded by query",
        "",
        "| cascade | recall@1 [95% CI] | recall@10 [95% CI] | nDCG@10 | FLOPs per query | median ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in reports.items():
        c1, c10 = round(r.recall_at_1 * r.queries), round(r.recall_at_k * r.queries)
        i1, i10 = wilson_interval(c1, r.queries), wilson_interval(c10, r.queries)
        lines.append(
            f"| {name} | {r.recall_at_1:.3f} [{i1[0]:.3f}, {i1[1]:.3f}] | {r.recall_at_k:.3f} [{i10[0]:.3f}, "
            f"{i10[1]:.3f}] | {r.ndcg_at_10:.3f} | {r.flops:,.0f} | {r.ms:.1f} |"
        )
    return "\n".join(lines) + "\n"


def sweet_spot_plot(out: Path, path: Path, aggs: tuple[str, ...] = ("mean_logit", "lstm")) -> None:
    """n-accuracy at the largest affordable n (<= 16) against the variant's FLOPs per pair, one line per budget and
    one panel per aggregator; fine-tuned and registry variants only (the family the sweet spot is about); the
    points are the mean over seeds, the bars the seeds' range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [json.loads(p.read_text()) for p in sorted(out.glob("seed-*/results.json"))]
    rows0 = data[0]["rows"]
    flops = {r["variant"]: r["flops_item"] for r in rows0}
    family = sorted((v for v in flops if v.startswith("pair-") or "+ft" in v), key=lambda v: flops[v])
    budgets = list(zip(data[0]["config"]["budgets"], data[0]["config"]["budgets_in_dense_passes"], strict=True))
    fig, axes = plt.subplots(1, len(aggs), figsize=(5.2 * len(aggs) + 1.6, 3.8), sharey=True, squeeze=False)
    for ax, agg in zip(axes[0], aggs, strict=True):
        for b, passes in budgets:
            xs, ys, lo, hi = [], [], [], []
            for v in family:
                vals = []
                for d in data:
                    fit = [
                        r for r in d["rows"] if r["variant"] == v and r["aggregator"] == agg and r["flops_tuple"] <= b
                    ]
                    if fit:
                        vals.append(max(fit, key=lambda r: r["n"])["n_accuracy"])
                if len(vals) == len(data):
                    xs.append(flops[v])
                    ys.append(sum(vals) / len(vals))
                    lo.append(ys[-1] - min(vals))
                    hi.append(max(vals) - ys[-1])
            if len(xs) > 1:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", ms=3, capsize=2, label=f"{passes:g} dense passes")
        ax.set_xscale("log")
        ax.set_xlabel("FLOPs per pair of the variant (n = largest affordable, <= 16)")
        ax.set_title(f"aggregator {agg}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("n-accuracy over grades")
    handles, labels = axes[0, -1].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.legend(handles, labels, loc="center right", fontsize=7, title="budget per tuple", title_fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, default=Path("/work/home-default"))
    p.add_argument("--out", type=Path, default=Path("var/bench/pair-gadgets"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--keeps", type=lambda s: [float(v) for v in s.split(",")], default=[0.02, 0.05, 0.2, 0.5])
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--tuples", type=int, default=2000, help="test tuples per cell")
    p.add_argument("--train-tuples", type=int, default=6000, help="gadget training pool (n_max members each)")
    p.add_argument("--val-tuples", type=int, default=1000)
    p.add_argument("--n-max", type=int, default=16)
    p.add_argument("--gadget-steps", type=int, default=1500)
    p.add_argument("--gadget-hidden", type=int, default=32)
    p.add_argument(
        "--budgets", type=lambda s: [float(v) for v in s.split(",")], default=[0.05, 0.1, 0.25, 0.5, 1, 2, 4]
    )
    p.add_argument("--prior", choices=["train", "balanced"], default="train", help="grade prior of the tuples")
    p.add_argument("--summarise", action="store_true", help="only write OUT/summary.md from the seeds' results")
    p.add_argument("--faiss-mix", action="store_true", help="only print the grade mix of stage 0's candidates")
    p.add_argument("--diagnose", action="store_true", help="only the shared-query control (registry variants)")
    p.add_argument("--cascade", action="store_true", help="only the served cascade with each aggregator (--home)")
    p.add_argument("--queries", type=int, default=500, help="with --cascade: held-out queries")
    args = p.parse_args(argv)
    if args.cascade:
        import torch

        torch.set_num_threads(1)
        text = cascade_comparison(args.home, args.queries)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cascade.md").write_text(text)
        print(text)
        return 0
    if args.summarise:
        print(summarise(args.out))
        sweet_spot_plot(args.out, args.out / "pair_sweet_spot.png")
        return 0
    if args.faiss_mix:
        text = faiss_grade_mix(args.home, [10, 40, 100, 200])
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "faiss_grade_mix.md").write_text(text)
        print(text)
        return 0
    if args.diagnose:
        import torch

        torch.set_num_threads(1)
        variants, ctx = build_variants(args.home, [], 0)
        text = diagnose(variants, ctx, args.seeds[0], args.tuples, args.n_max)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"diagnose-s{args.seeds[0]}.md").write_text(text)
        print(text)
        return 0
    import torch

    torch.set_num_threads(1)
    todo = [s for s in args.seeds if not (args.out / f"seed-{s}" / "results.json").exists()]
    if not todo:
        _log("every seed is done")
        return 0
    variants, ctx = build_variants(args.home, args.keeps, args.finetune_steps)
    for seed in todo:
        run_seed(variants, ctx, seed, args, args.out / f"seed-{seed}")
    print(summarise(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
