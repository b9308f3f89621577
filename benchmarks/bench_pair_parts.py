"""Where a pair model's time goes, per part of `PairNetwork.score`, for every pair variant of a home (not a test).

    .venv/bin/python -m benchmarks.bench_pair_parts --home var --pairs 400

Pruning shrinks the scorer only; the trunk, the correlation over shifts and its normalisation are the same in
every variant. This prints, side by side in one run (medians of --repeats calls, 1 thread), the milliseconds of
--pairs items against one query: as served (the query prepared for that many items, folded when that is
cheaper, against cached item inputs), the fold alone, the folded pairs alone, the unfolded forward from raw
items, and its parts (the item inputs, i.e. trunk and energies, are cached when served), so the share that
pruning cannot touch is measured, not guessed. FLOPs are the served ones per query (`PairNetwork.flops`).
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
    n = len(x)  # type: ignore[arg-type]
    with torch.inference_mode():
        fq, fx = model.query_features(q), model.item_features(x)  # type: ignore[attr-defined]
        z = model.interact(fq, fx)  # type: ignore[attr-defined]
        inputs = model.item_inputs(x)  # type: ignore[attr-defined]
        folded = model.fold_query(fq)  # type: ignore[attr-defined]
        return {
            # as the cascade serves it: the query prepared for n items (folded or not), cached item inputs
            "served": _median_ms(
                lambda: model.score_prepared(model.prepare(q, n), inputs),  # type: ignore[attr-defined]
                repeats,
            ),
            "fold": _median_ms(lambda: model.fold_query(fq), repeats),  # type: ignore[attr-defined]
            "folded pairs": _median_ms(lambda: model.score_prepared(folded, inputs), repeats),  # type: ignore[attr-defined]
            "unfolded": _median_ms(lambda: model.forward_with_hidden(q, x), repeats),  # type: ignore[attr-defined]
            "item inputs": _median_ms(lambda: model.item_inputs(x), repeats),  # type: ignore[attr-defined]
            "correlate": _median_ms(lambda: correlate(fq, fx, spec.max_shift, spec.regions), repeats),
            "interact": _median_ms(lambda: model.interact(fq, fx), repeats),  # type: ignore[attr-defined]
            "scorer": _median_ms(lambda: model.scorer.forward_with_hidden(z), repeats),  # type: ignore[attr-defined]
        }


def main(argv: list[str] | None = None) -> int:
    import torch

    from cascade.space import Space
    from models.pair import PairNetwork
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
    cols = ["served", "fold", "folded pairs", "unfolded", "item inputs", "correlate", "energies+norm", "scorer"]
    print(f"{'variant':12s} {'FLOPs/query':>12s} {'folds':>5s} " + " ".join(f"{c:>13s}" for c in cols))
    for name in registry.names():
        if registry.active_version(name) is None:
            continue
        model = registry.load(name).model
        if not isinstance(model, PairNetwork):
            continue
        parts = _parts(model, q, x, args.repeats)
        parts["energies+norm"] = parts["interact"] - parts["correlate"]
        flops = model.flops(args.pairs).nonzero
        print(f"{name:12s} {flops:12,d} {model.folds(args.pairs)!s:>5s} " + " ".join(f"{parts[c]:13.2f}" for c in cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
