"""Microseconds per (q, x) pair of the default pair model and structured variants, 1 thread, item features
cached: the plain path (`forward_features`) and the folded path (`fold_query` + `forward_folded`), with the
FLOPs of each. Times do not depend on the weights' values (structured variants have fixed widths), so the
models are untrained; accuracy is measured in bench_premise.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_pair_speed.py [--items 10000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from models.pair import PairNetwork, default_pair_spec, folded_pair_cost, pair_cost
from models.pair_training import pair_calibration
from models.prototypes import PrototypeConfig, make_prototype_set
from models.pruning.pair import prune_pair


@torch.no_grad()
def microseconds_per_pair(
    model: PairNetwork, x: torch.Tensor, folded: bool, repeats: int, chunk: int = 2000
) -> tuple[float, float]:
    """(median, min) microseconds per pair of one query against all of x; folding is timed with it."""
    fx = model.item_features(x)
    energies = model.item_energies(fx) if model.spec.energies else None
    fq = model.query_features(x[:1])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        if folded:
            f = model.fold_query(fq)
            for j in range(0, len(fx), chunk):
                model.forward_folded(f, fx[j : j + chunk], None if energies is None else energies[j : j + chunk])
        else:
            for j in range(0, len(fx), chunk):
                model.forward_features(fq, fx[j : j + chunk])
        times.append(time.perf_counter() - start)
    return 1e6 * float(np.median(times)) / len(x), 1e6 * float(np.min(times)) / len(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = make_prototype_set(PrototypeConfig(num_prototypes=max(args.items // 10, 10)), "space")
    x = torch.from_numpy(data.x[: args.items])
    dense = PairNetwork(default_pair_spec()).eval()
    calibration = pair_calibration(make_prototype_set(PrototypeConfig(num_prototypes=200, views=2), "train"), 256)
    variants = {"dense": dense}
    for keep in (0.25, 0.1):
        variants[f"greedy-asymmetric keep {keep}"] = prune_pair(
            dense, "greedy-asymmetric", keep, calibration, reweight=True
        )
    for name, model in variants.items():
        plain = microseconds_per_pair(model, x, folded=False, repeats=args.repeats)
        folded = microseconds_per_pair(model, x, folded=True, repeats=args.repeats)
        per_pair, per_query = folded_pair_cost(model)
        row = {
            "variant": name,
            "scorer_hidden": list(model.spec.scorer.hidden),
            "flops_per_pair_plain": pair_cost(model).per_pair.dense_kernel,
            "flops_per_pair_folded": per_pair.dense_kernel,
            "flops_fold_per_query": per_query.dense_kernel,
            "us_per_pair_plain_median_min": [round(v, 2) for v in plain],
            "us_per_pair_folded_median_min": [round(v, 2) for v in folded],
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
