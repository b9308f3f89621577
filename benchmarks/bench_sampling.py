"""Member sampling: the dense-key path (`argpartition` over a clusters x widest key matrix) against the
sorted-key path (one `lexsort` over every member), on the same clusters, interleaved, medians. For n = 1 also
`sample_members` itself, which then draws one uniform member per cluster without any keys.

    .venv/bin/python -m benchmarks.bench_sampling --clusters 10000 --size 10 --samples 1,2,4
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from cascade.space import sample_dense_keys, sample_members, sample_sorted_keys

__all__ = ["main"]


def _seconds(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clusters", type=int, default=10_000)
    p.add_argument("--size", type=int, default=10)
    p.add_argument("--samples", default="1,2,4")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    sizes = np.full(args.clusters, args.size)
    starts = np.arange(args.clusters) * args.size
    rng = np.random.default_rng(0)
    print(f"{args.clusters} clusters of {args.size}; median of {args.repeats} interleaved rounds")
    offsets = np.append(starts, args.clusters * args.size)
    clusters = np.arange(args.clusters)
    print(f"{'n':>3} {'sorted ms':>10} {'dense ms':>9} {'speedup':>8} {'uniform ms (n=1)':>17}")
    for n in (int(s) for s in args.samples.split(",")):
        counts = np.minimum(sizes, n)
        sorted_t, dense_t, uniform_t = [], [], []
        for _ in range(args.repeats):
            sorted_t.append(_seconds(lambda: sample_sorted_keys(starts, sizes, counts, rng)))  # noqa: B023
            dense_t.append(_seconds(lambda: sample_dense_keys(starts, sizes, n, args.size, rng)))  # noqa: B023
            if n == 1:
                uniform_t.append(_seconds(lambda: sample_members(offsets, clusters, 1, rng)))
        s, d = statistics.median(sorted_t) * 1e3, statistics.median(dense_t) * 1e3
        u = f"{statistics.median(uniform_t) * 1e3:>17.3f}" if uniform_t else f"{'-':>17}"
        print(f"{n:>3} {s:>10.2f} {d:>9.2f} {s / d:>7.1f}x {u}")


if __name__ == "__main__":
    main()
