"""Elimination-compensation against magnitude and SNIP on the bootstrap's models (not a test).

    .venv/bin/python -m benchmarks.bench_ec run --seeds 0 1 2 --out var/bench/ec.jsonl
    .venv/bin/python -m benchmarks.bench_ec report --results var/bench/ec.jsonl

Dense models: the bootstrap's MNIST-1D MLP (40-256-256-10) and CNN (`cnn1d`, 32/64 channels, 128 hidden), trained
exactly as `prunecascade bootstrap` trains (52,000 items generated with the seed, 20,800 train), by
`benchmarks.bench_dense bootstrap` (whose saved weights are reused; trained here if missing). 512 calibration items
from the training split, drawn by the seed. For every (model, seed, scope, kept fraction): the test cross-entropy
right after pruning (no fine-tuning) of `magnitude`, `snip`, `elimination-compensation` (one shot, through
`prune()`), its mask without the bias shifts, and `prune_in_rounds` with r = 2..5 rounds. `run` appends JSON
lines and skips cells already present, so an interrupted run resumes.
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

import torch
import torch.nn.functional as F

from benchmarks.common import done_keys
from models.data import Splits, load_dataset
from models.dense import default_spec
from models.evaluation import accuracy, predict_logits
from models.networks import Classifier, build_network
from models.pruning import apply_masks, prune, select_masks
from models.pruning.elimination import prune_in_rounds, score_elimination_compensation
from models.pruning.pipeline import calibration_from
from models.training import TrainConfig, train_classifier

__all__ = ["main"]

ARCHS = ("mlp", "cnn1d")
KEEPS = (0.5, 0.3, 0.1)
SCOPES = ("global", "layer")
ROUNDS = (2, 3, 4, 5)
BASE = ("magnitude", "snip", "ec", "ec-no-comp")


def _dense(arch: str, seed: int, models: Path, cache: Path) -> tuple[Classifier, Splits]:
    splits = load_dataset("mnist1d", seed=seed, num_samples=52_000, cache_dir=cache)
    model = build_network(default_spec(splits, arch))  # type: ignore[arg-type]
    path = models / f"{arch}-s{seed}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        torch.manual_seed(seed)
        model = build_network(default_spec(splits, arch))  # type: ignore[arg-type]
        config = TrainConfig(seed=seed, progress=False)
        train_classifier(model, splits.x_train, splits.y_train, splits.x_val, splits.y_val, config)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval(), splits


def _measure(model: Classifier, splits: Splits) -> dict[str, float]:
    logits = predict_logits(model, splits.x_test)
    return {
        "loss": float(F.cross_entropy(logits, torch.as_tensor(splits.y_test))),
        "acc": accuracy(model, splits.x_test, splits.y_test),
    }


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_keys(out, ("arch", "seed", "scope", "keep", "method"))
    for seed in args.seeds:
        for arch in args.archs:
            dense, splits = _dense(arch, seed, Path(args.models), Path(args.cache))
            cal = calibration_from(splits, 512, seed)
            for scope in SCOPES:
                for keep in args.keeps:
                    methods = [*BASE, *(f"ec-r{r}" for r in args.rounds)]
                    for method in methods:
                        key = (arch, seed, scope, keep, method)
                        if key in done:
                            continue
                        t0 = time.perf_counter()
                        torch.manual_seed(seed)
                        if method in ("magnitude", "snip"):
                            pruned = prune(dense, method, keep, cal, scope=scope)
                        elif method == "ec":
                            pruned = prune(dense, "elimination-compensation", keep, cal, scope=scope)
                        elif method == "ec-no-comp":
                            masks = select_masks(score_elimination_compensation(dense, cal), keep, scope)
                            pruned = apply_masks(copy.deepcopy(dense), masks)
                        else:
                            pruned = prune_in_rounds(dense, keep, cal, scope, int(method.removeprefix("ec-r")))
                        row: dict[str, Any] = {"arch": arch, "seed": seed, "scope": scope, "keep": keep}
                        row |= {"method": method, **_measure(pruned, splits)}
                        row["seconds"] = round(time.perf_counter() - t0, 2)
                        with out.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                        print(json.dumps(row), flush=True)


def report(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines()]
    cells: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    by_seed: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        cells[(r["arch"], r["scope"], r["keep"])][r["method"]].append(r["loss"])
        by_seed[(r["arch"], r["scope"], r["keep"], r["seed"])][r["method"]] = r["loss"]
    methods = [m for m in (*BASE, *(f"ec-r{r}" for r in ROUNDS)) if any(m in c for c in cells.values())]
    seeds = sorted({r["seed"] for r in rows})
    print(f"test loss right after pruning, mean ± std over seeds {seeds}; wins: seeds where the loss is below both")
    print("magnitude's and SNIP's (EC: one shot; r5: 5 rounds)\n")
    print("| model | scope | kept | " + " | ".join(methods) + " | EC wins | r5 wins |")
    print("|---|---|---|" + "---|" * (len(methods) + 2))
    for key in sorted(cells, key=lambda k: (k[0], k[1], -k[2])):
        c = cells[key]
        vals = []
        for m in methods:
            v = c.get(m, [])
            cell = f"{statistics.mean(v):.3f}±{statistics.pstdev(v):.3f}" if v else ""
            vals.append(cell if len(v) in (0, len(seeds)) else f"{cell} ({len(v)} seed)")
        wins = rwins = 0
        for s in seeds:
            d = by_seed.get((*key, s), {})
            if not all(m in d for m in ("ec", "magnitude", "snip")):
                continue
            base = min(d["magnitude"], d["snip"])
            wins += d["ec"] < base
            rwins += "ec-r5" in d and d["ec-r5"] < base
        print(
            f"| {key[0]} | {key[1]} | {key[2]} | "
            + " | ".join(vals)
            + f" | {wins}/{len(seeds)} | {rwins}/{len(seeds)} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(required=True)
    r = sub.add_parser("run")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--archs", nargs="+", default=list(ARCHS))
    r.add_argument("--keeps", type=float, nargs="+", default=list(KEEPS))
    r.add_argument("--rounds", type=int, nargs="+", default=list(ROUNDS))
    r.add_argument("--out", default="var/bench/ec.jsonl")
    r.add_argument("--models", default="var/bench/bootstrap-dense")
    r.add_argument("--cache", default="var/bench/data")
    r.set_defaults(func=run)
    p = sub.add_parser("report")
    p.add_argument("--results", default="var/bench/ec.jsonl")
    p.set_defaults(func=report)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
