"""What the open-loop p99 target allows, by simulation (not a test, no server): requests at fixed intervals, as
`bench_concurrency`'s open loop sends them, served by W workers, each one request at a time, in a fixed time per
request. Two ways to hand requests to workers:

- `shared queue`: the next request goes to the first free worker (a load balancer that knows who is busy);
- `pinned`: each request goes to a worker chosen at random, as a keep-alive connection pins its requests to the
  worker that accepted it (`bench_concurrency`'s senders take the next request whichever worker they talk to).

    PYTHONPATH=. .venv/bin/python -m benchmarks.queueing_bound --rate 200.8 --service-ms 7.4 --workers 2 \
        --reference-p99-ms 8.0

`--service-ms` is the 1-client median latency and `--reference-p99-ms` the 1-client p99 of the same run; the
ratio printed is the target's (p99 over the 1-client p99, at most 3).

It is a bound, not a forecast: measured, a real shared queue (`bench_concurrency --server NAME,workers=2,FRONT=nginx`,
docs/performance.md 0b) did not come near the simulated 0.93x at the target's load, because real queries vary and
cost more CPU under load than alone.
"""

from __future__ import annotations

import argparse

import numpy as np

__all__ = ["simulate"]


def simulate(rate: float, service_ms: float, workers: int, pinned: bool, count: int, seed: int = 0) -> np.ndarray:
    """Latency (ms) of `count` requests arriving every 1000 / rate ms, each served in `service_ms`."""
    rng = np.random.default_rng(seed)
    free_at = np.zeros(workers)
    out = np.empty(count)
    for i in range(count):
        t = i * 1000.0 / rate
        w = int(rng.integers(workers)) if pinned else int(np.argmin(free_at))
        start = max(t, free_at[w])
        free_at[w] = start + service_ms
        out[i] = free_at[w] - t
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, required=True, help="requests per second")
    p.add_argument("--service-ms", type=float, required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reference-p99-ms", type=float, required=True)
    p.add_argument("--count", type=int, default=200_000)
    args = p.parse_args(argv)
    load = args.rate * args.service_ms / 1000.0 / args.workers
    print(f"{args.workers} workers at {load:.0%} load ({args.rate} per s, {args.service_ms} ms each)")
    print("| hand-out | p50 ms | p99 ms | p99 / 1-client p99 |")
    print("|---|---|---|---|")
    for pinned in (False, True):
        lat = simulate(args.rate, args.service_ms, args.workers, pinned, args.count)
        p50, p99 = np.percentile(lat, [50, 99])
        name = "pinned to a random worker" if pinned else "shared queue"
        print(f"| {name} | {p50:.1f} | {p99:.1f} | {p99 / args.reference_p99_ms:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
