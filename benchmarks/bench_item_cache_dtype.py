"""The item cache in float16 against float32: memory, speed and what it does to the answers (not a test).

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_item_cache_dtype \
        --home /work/home-default --queries 200 --rounds 3

Two snapshots of the same home, one whose item cache holds float32 (the default) and one float16 (rows are
widened to float32 when gathered, `Snapshot.item_inputs`). Every held-out query runs the default cascade on
both with the same seed, alternating which goes first; reported: the table's bytes, the median time per query
(ratio float16 / float32, paired per query), how many answers have the same top 10 in the same order, the mean
overlap of the two top-10 sets, recall@1 and recall@10 of the query's own cluster with each, and the largest
difference of a returned posterior.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import median, set_threads

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, default=Path("/work/home-default"))
    p.add_argument("--space", default="default")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--k", type=int, default=10)
    args = p.parse_args(argv)
    set_threads(1)
    from cascade.config import CONFIG_FILE, CascadeConfig
    from cascade.plan import Query, execute, plan_query
    from cascade.snapshot import ItemCache, load_snapshot
    from models.registry import ModelRegistry

    registry = ModelRegistry(args.home / "registry")
    config = CascadeConfig.load(args.home / CONFIG_FILE)
    space_dir = args.home / "spaces" / args.space
    snaps = {d: load_snapshot(registry, space_dir, config, ItemCache(dtype=d)) for d in ("float32", "float16")}
    for s in snaps.values():
        s.warm()
    qs = snaps["float32"].queries
    assert qs is not None
    n = min(args.queries, len(qs))
    times: dict[str, list[float]] = {d: [] for d in snaps}
    answers: dict[str, list] = {d: [] for d in snaps}
    for r in range(args.rounds):
        for i in range(n):
            order = ("float32", "float16") if (i + r) % 2 == 0 else ("float16", "float32")
            for d in order:
                snap = snaps[d]
                t0 = time.perf_counter()
                plan = plan_query(snap, Query(examples=qs.x[i : i + 1], k=args.k))
                result = execute(plan, seed=i)
                times[d].append((time.perf_counter() - t0) * 1000.0)
                if r == 0:
                    answers[d].append(result)
    a32, a16 = answers["float32"], answers["float16"]
    same_order = sum(np.array_equal(x.cluster_ids, y.cluster_ids) for x, y in zip(a32, a16, strict=True))
    overlap = np.mean([len(set(x.cluster_ids) & set(y.cluster_ids)) / args.k for x, y in zip(a32, a16, strict=True)])
    posterior_diff = max(
        float(np.abs(x.posteriors - y.posteriors).max())
        for x, y in zip(a32, a16, strict=True)
        if np.array_equal(x.cluster_ids, y.cluster_ids)
    )

    def recall(results, at: int) -> float:
        return float(np.mean([qs.cluster[i] in r.cluster_ids[:at] for i, r in enumerate(results)]))

    ratios = [b / a for a, b in zip(times["float32"], times["float16"], strict=True)]
    out = {
        "queries": n,
        "rounds": args.rounds,
        "item_cache_bytes": {d: sum(e.nbytes for e in s.item_cache.entries()) for d, s in snaps.items()},
        "ms_per_query_median": {d: median(v) for d, v in times.items()},
        "time_ratio_float16_over_float32_median": median(ratios),
        "same_top10_in_order": f"{same_order}/{n}",
        "top10_overlap_mean": float(overlap),
        "largest_posterior_difference_where_same": posterior_diff,
        "recall_at_1": {d: recall(a, 1) for d, a in answers.items()},
        "recall_at_10": {d: recall(a, 10) for d, a in answers.items()},
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
