"""Where a pair model's time goes, per part of `PairNetwork.score`, for every pair variant of a home (not a test).

    .venv/bin/python -m benchmarks.bench_pair_parts --home var --pairs 400

Pruning shrinks the scorer only; the trunk, the correlation over shifts and its normalisation are the same in
every variant. This prints, side by side in one run (medians of --repeats calls, 1 thread), the milliseconds of
--pairs items against one query: as served (the query folded into the first layer, fold included), unfolded,
and each unfolded part, so the share that pruning cannot touch is measured, not guessed. FLOPs per pair are the
served ones (`models.pair.pair_flops`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import set_threads

__all__ = ["main"]


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def _parts(model: object, q: object, x: object, repeats: int) -> dict[str, float]:
    import torch

    from models.pair import correlate

    spec = model.spec  # type: ignore[attr-defined]
    with torch.inference_mode():
        fq, fx = model.query_features(q), model.item_features(x)  # type: ignore[attr-defined]
        z = model.interact(fq, fx)  # type: ignore[attr-defined]
        return {
            "served": _median_ms(lambda: model.score(q, x), repeats),  # type: ignore[attr-defined]
            "unfolded": _median_ms(lambda: model.forward_with_hidden(q, x), repeats),  # type: ignore[attr-defined]
            "trunk": _median_ms(lambda: model.item_features(x), repeats),  # type: ignore[attr-defined]
            "correlate": _median_ms(lambda: correlate(fq, fx, spec.max_shift, spec.regions), repeats),
            "interact": _median_ms(lambda: model.interact(fq, fx), repeats),  # type: ignore[attr-defined]
            "scorer": _median_ms(lambda: model.scorer.forward_with_hidden(z), repeats),  # type: ignore[attr-defined]
        }


def main(argv: list[str] | None = None) -> int:
    import torch

    from cascade.space import Space
    from models.pair import PairNetwork, pair_flops
    from models.registry import ModelRegistry

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path("var"))
    parser.add_argument("--pairs", type=int, default=400, help="items scored against one query per call")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    set_threads(1)
    registry = ModelRegistry(args.home / "registry")
    space = Space.load(args.home / "spaces" / "default")
    rng = np.random.default_rng(0)
    x = torch.from_numpy(space.features[rng.choice(space.num_items, args.pairs, replace=False)])
    q = torch.from_numpy(space.features[rng.integers(space.num_items)][None, :].copy())
    print(f"{args.pairs} items against one query, medians of {args.repeats} calls, 1 thread (ms)")
    header = f"{'variant':12s} {'FLOPs/pair':>11s} {'served':>7s} {'unfolded':>8s} {'trunk':>7s} {'correlate':>9s}"
    print(f"{header} {'energies+norm':>13s} {'scorer':>7s}")
    for name in registry.names():
        if registry.active_version(name) is None:
            continue
        model = registry.load(name).model
        if not isinstance(model, PairNetwork):
            continue
        parts = _parts(model, q, x, args.repeats)
        rest = parts["interact"] - parts["correlate"]
        flops = pair_flops(model).nonzero
        print(
            f"{name:12s} {flops:11,d} {parts['served']:7.2f} {parts['unfolded']:8.2f} {parts['trunk']:7.2f} "
            f"{parts['correlate']:9.2f} {rest:13.2f} {parts['scorer']:7.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
