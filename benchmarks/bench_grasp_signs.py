"""How GraSP's scores split by sign on a trained network, per layer (not a test).

    .venv/bin/python -m benchmarks.bench_grasp_signs --seeds 0

Why: docs/pruning.md explains GraSP's chance-level accuracy on trained networks by the sign of -w * (H g): if
about half of every layer's scores are positive, keeping the highest half selects by sign. This prints the
positive share per layer of `score_grasp` on `bench_pruning`'s MNIST-1D MLP (the same trained model, cached in
`--cache`, and the same 512 calibration items of the seed).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

__all__ = ["main", "positive_shares"]


def positive_shares(seed: int, cache: Path) -> dict[str, float]:
    import torch

    from benchmarks.bench_pruning import trained_dense
    from models.pruning.pipeline import calibration_from
    from models.pruning.unstructured import score_grasp

    torch.set_num_threads(1)
    dense, splits = trained_dense("mnist1d-mlp", seed, cache)
    scores = score_grasp(copy.deepcopy(dense), calibration_from(splits, 512, seed))
    return {name: float((s > 0).double().mean()) for name, s in scores.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--cache", default="var/bench/models", help="bench_pruning's trained dense models")
    args = p.parse_args(argv)
    for seed in args.seeds:
        shares = positive_shares(seed, Path(args.cache))
        cells = ", ".join(f"{name} {share:.1%}" for name, share in shares.items())
        print(f"mnist1d-mlp seed {seed}: positive share of -w*(Hg) per layer: {cells}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
