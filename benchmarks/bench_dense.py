"""Dense accuracy, reproducibly (not a test).

    .venv/bin/python -m benchmarks.bench_dense bootstrap --seeds 0 1 2 --archs cnn1d mlp --threads 2
    .venv/bin/python -m benchmarks.bench_dense paper --seeds 0 1 2 --archs cnn1d mlp

`bootstrap` trains exactly as `prunecascade bootstrap` does (52,000 MNIST-1D items generated with the seed, the
seeded train/val/test/pool split, `default_spec`, `TrainConfig(epochs=40, seed=seed)`); seed 0 with `cnn1d` is the
`dense` model that `make run` registers. `--threads` sets torch's threads outside training (training itself
always runs on one: `models.training.deterministic_training`), so two runs with different values must print the
same accuracies.

`paper` is the MNIST-1D paper's protocol: the standard dataset `make_dataset(get_dataset_args())` (5,000 items,
data seed 42, generated locally, never downloaded), its 4,000 train / 1,000 test split; the last 400 of the 4,000
training items are held out for early stopping, so 3,600 take gradient steps. The seed sets the initialisation
and the batch order. One JSON line per run, then a summary (mean ± sample std over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from models.data import Splits, load_dataset
from models.dense import default_spec
from models.evaluation import accuracy
from models.networks import build_network
from models.training import TrainConfig, train_classifier

__all__ = ["main", "paper_splits"]

PAPER_VAL = 400


def paper_splits() -> Splits:
    """The standard MNIST-1D split (4,000 / 1,000), generated locally; 400 training items kept for validation."""
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    x, y = data["x"].astype(np.float32), data["y"].astype(np.int64)
    xt, yt = data["x_test"].astype(np.float32), data["y_test"].astype(np.int64)
    n = len(x) - PAPER_VAL
    return Splits(
        name="mnist1d-paper",
        num_classes=10,
        x_train=x[:n],
        y_train=y[:n],
        x_val=x[n:],
        y_val=y[n:],
        x_test=xt,
        y_test=yt,
        x_pool=xt[:1],
        y_pool=yt[:1],
        cluster_pool=None,
    )


def _run(splits: Splits, arch: str, seed: int, epochs: int, save: Path | None = None) -> dict[str, object]:
    """Train as the bootstrap does; `save`: where to keep the weights (bench_ec reuses them)."""
    torch.manual_seed(seed)
    model = build_network(default_spec(splits, arch))  # type: ignore[arg-type]
    t0 = time.perf_counter()
    report = train_classifier(
        model,
        splits.x_train,
        splits.y_train,
        splits.x_val,
        splits.y_val,
        TrainConfig(epochs=epochs, seed=seed, progress=False),
    )
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), save)
    return {
        "arch": arch,
        "seed": seed,
        "train": len(splits.x_train),
        "val": len(splits.x_val),
        "test": len(splits.x_test),
        "test_accuracy": accuracy(model, splits.x_test, splits.y_test),
        "best_epoch": report.best_epoch,
        "epochs_run": report.epochs_run,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("protocol", choices=["bootstrap", "paper"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--archs", nargs="+", default=["cnn1d", "mlp"], choices=["cnn1d", "mlp"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads outside training")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--cache", type=Path, default=Path("var/bench/data"))
    parser.add_argument("--models", type=Path, default=Path("var/bench/bootstrap-dense"), help="weights (bootstrap)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    paper = paper_splits() if args.protocol == "paper" else None
    for seed in args.seeds:
        splits = paper or load_dataset("mnist1d", seed=seed, num_samples=52_000, cache_dir=args.cache)
        for arch in args.archs:
            save = args.models / f"{arch}-s{seed}.pt" if paper is None and args.epochs == 40 else None
            row = {"protocol": args.protocol, "threads": args.threads, **_run(splits, arch, seed, args.epochs, save)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    for arch in args.archs:
        accs = [float(r["test_accuracy"]) for r in rows if r["arch"] == arch]  # type: ignore[arg-type]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(
            f"{args.protocol} {arch}: test accuracy {statistics.mean(accs):.4f} ± {spread:.4f} over seeds {args.seeds}"
        )


if __name__ == "__main__":
    main()
