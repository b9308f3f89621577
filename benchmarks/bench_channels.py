"""Time per item of small 1-D CNNs against their channel count (not a test).

    .venv/bin/python -m benchmarks.bench_channels --channels 2,3,4,6,8,12,16,32 --repeats 5 \
        --out var/bench/channels.json

Why: the 6,620-FLOP first-stage variants (`cnn-s10f`/`cnn-s10g`, 3 and 6 channels) run far below the machine's
matmul rate, which caps the cascade's wall-time ratio (docs/performance.md section 1). This measures whether
their time follows FLOPs or the channel count: random-weight networks of the default architecture's shape
(`cnn1d`, channels (c, 2c), hidden 4c, so c = 32 is the dense model's shape and c = 3 the 10% variants'), no
model home needed. Every repeat times a 1024 x 1024 fp32 matmul and every network back to back, through the
serving forward pass (`models.inference.forward_chunked`, the default 2 MiB activation budget) over `--batch`
random items (20,000: the first stage of a rare query with 2 samples from each of 10,000 clusters); medians.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import dump_json, median, parse_ints, set_threads

__all__ = ["main", "measure", "shape"]

INPUT_DIM = 40  # MNIST-1D
CLASSES = 10


def shape(channels: int):
    """The default CNN's proportions (channels 32, 64; hidden 128) at `channels` first-layer channels."""
    from models.spec import NetworkSpec

    return NetworkSpec("cnn1d", INPUT_DIM, CLASSES, hidden=(4 * channels,), channels=(channels, 2 * channels))


def _time(fn: Callable[[], object], min_seconds: float = 0.2) -> float:
    """Seconds per call, repeating the call until `min_seconds` have passed (at least once)."""
    calls, started = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return elapsed / calls


def measure(channels: tuple[int, ...], repeats: int, batch: int, threads: int, matmul_n: int = 1024) -> dict:
    import torch

    from models.flops import count_flops
    from models.inference import chunk_rows, forward_chunked
    from models.networks import build_network

    set_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(batch, INPUT_DIM)
    a, b = torch.randn(matmul_n, matmul_n), torch.randn(matmul_n, matmul_n)
    nets = {c: build_network(shape(c)).eval() for c in channels}
    rows = {c: chunk_rows(nets[c].spec) for c in channels}
    flops = {c: count_flops(nets[c], INPUT_DIM).dense_kernel for c in channels}
    us: dict[int, list[float]] = {c: [] for c in channels}
    matmul: list[float] = []
    with torch.inference_mode():
        for c in channels:  # warm-up: first calls allocate and pick kernels
            forward_chunked(nets[c], x[: rows[c]], rows[c])
        for _ in range(repeats):
            matmul.append(2 * matmul_n**3 / _time(lambda: a @ b) / 1e9)
            for c in channels:
                sec = _time(lambda n=nets[c], r=rows[c]: forward_chunked(n, x, r))
                us[c].append(sec / batch * 1e6)
    mm = median(matmul)
    table = []
    print(f"torch threads {threads}, {batch:,} items, median of {repeats}; matmul {mm:.1f} GFLOP/s")
    print(f"{'channels':>8} {'hidden':>6} {'FLOPs/item':>10} {'rows/chunk':>10} {'us/item':>8} {'x matmul':>8}")
    for c in channels:
        per = median(us[c])
        frac = flops[c] / per / 1e3 / mm
        table.append(
            {
                "channels": [c, 2 * c],
                "hidden": 4 * c,
                "flops": flops[c],
                "chunk_rows": rows[c],
                "us_per_item": per,
                "us_per_item_all": us[c],
                "fraction_of_matmul": frac,
            }
        )
        print(f"{c:>4},{2 * c:<3} {4 * c:>6} {flops[c]:>10,} {rows[c]:>10,} {per:>8.2f} {frac:>8.3f}")
    return {"batch": batch, "repeats": repeats, "threads": threads, "matmul_gflops": mm, "networks": table}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", default="2,3,4,6,8,12,16,32", help="first-layer channel counts (32: the dense)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=20_000)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the service default is 1)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    out = measure(parse_ints(args.channels), args.repeats, args.batch, args.threads)
    if args.out:
        dump_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
