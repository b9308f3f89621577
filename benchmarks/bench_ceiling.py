"""The ceiling of queries by example on a prototype space: the Bayes-optimal ranking (`lab/ceiling.py`,
the exact likelihood of the generator's noise model, jitter marginalised) on the same held-out queries as every
other method, scored as they are (`cascade.evaluation.graded_metrics`, gains [0, 1, 3]).

A space of a home (its shipped queries, the first --queries of them as `bench_pair run --queries` takes):

    PYTHONPATH=. OMP_NUM_THREADS=1 python -m benchmarks.bench_ceiling --home /work/home-default --space default
    PYTHONPATH=. OMP_NUM_THREADS=1 python -m benchmarks.bench_ceiling --home H --space pairbig --split test

A space that `bench_pair prepare` would build, generated from its config and seeds alone (no home needed; the
generator is deterministic), e.g. the 100,000 items of docs/performance.md section 0:

    PYTHONPATH=. OMP_NUM_THREADS=1 python -m benchmarks.bench_ceiling --prototypes 10000 --seed 7 \\
        --made-queries 300 --query-seed 7 --queries 200

Two rows: the ranking by expected gain (the one that maximises expected nDCG@10) and the ranking by the
posterior of being the own prototype (the MAP answer, which maximises expected recall@1).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from benchmarks.common import set_threads
from lab.ceiling import measure, pair_space_config, space_config_of

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, help="a home whose space (--space) ships its held-out queries")
    p.add_argument("--space", default="default")
    p.add_argument("--prototypes", type=int, help="instead of a home: generate a space of this many prototypes")
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--seed", type=int, default=7, help="the generated space's seed (bench_pair prepare: 7)")
    p.add_argument("--made-queries", type=int, default=300, help="queries the generated space ships")
    p.add_argument("--query-seed", type=int, default=7, help="their seed (bench_pair prepare: the space's seed)")
    p.add_argument("--split", choices=("all", "dev", "test"), default="all", help="a home's queries: which split")
    p.add_argument("--queries", type=int, help="score the first N queries (default: all)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--chunk", type=int, default=64, help="prototypes per batch (memory ~ chunk x 7 x Q x 40)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args(argv)
    set_threads(1)

    if (args.home is None) == (args.prototypes is None):
        p.error("give either --home (and --space) or --prototypes")
    if args.home is None and args.split != "all":
        p.error("--split splits a home's shipped queries; generated queries have none")
    if args.home is not None:
        from cascade.queries import QuerySet

        space_dir = args.home / "spaces" / args.space
        config = space_config_of(space_dir)
        qs = QuerySet.load(space_dir)
        if qs is None:
            raise SystemExit(f"{space_dir} ships no held-out queries")
        qs = qs.split(args.split)
        xq, cq, yq = qs.x, qs.cluster, qs.label
        source = f"{space_dir} (shipped queries, {args.split})"
    else:
        from models.prototypes import make_queries

        config = replace(pair_space_config(), num_prototypes=args.prototypes, views=args.views, seed=args.seed)
        xq, cq, yq = make_queries(config, args.made_queries, seed=args.query_seed)
        source = f"generated: {args.made_queries} queries of seed {args.query_seed}"
    count = len(xq) if args.queries is None else min(args.queries, len(xq))
    xq, cq, yq = xq[:count], cq[:count], yq[:count]

    t0 = time.perf_counter()
    rows, scores = measure(config, xq, cq, yq, args.k, args.chunk)
    seconds = time.perf_counter() - t0
    own = np.exp(scores.log_posterior[np.arange(count), cq])
    print(
        f"space: {config.num_prototypes:,} prototypes x {config.views} views = {config.num_prototypes * config.views:,}"
        f" items, seed {config.seed}, jitter {config.jitter}; {count} queries, {source}; {seconds:.1f} s, 1 thread"
    )
    print(f"{'method':26s} {'R@1':>6s} {f'R@{args.k}':>6s} {'nDCG@10':>7s}")
    for name, m in rows.items():
        print(f"{name:26s} {m['recall@1']:6.3f} {m[f'recall@{args.k}']:6.3f} {m['ndcg@10']:7.3f}")
    print(f"posterior of the own prototype: median {np.median(own):.3f}, mean {own.mean():.3f}")
    if args.json is not None:
        out = {
            "config": asdict(config),
            "source": source,
            "queries": count,
            "seconds": round(seconds, 1),
            "rows": rows,
            "own_posterior_mean": float(own.mean()),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
