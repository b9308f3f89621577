"""Compute efficiency: GFLOP/s of each variant's forward pass against a large matmul on this machine (not a test).

    .venv/bin/python -m benchmarks.bench_compute --home /tmp/bench-home --threads 1,2 --repeats 7 \
        --out var/bench/compute.json

Why: the cascade's wall-time ratio can only follow its FLOPs ratio if the networks run near the machine's
attainable rate. Per thread count, every repeat times the matmul and every variant back to back; a variant's
efficiency is the median of its GFLOP/s over the median of the matmul's. Also measured side by side: the
library's member sampler (`cascade.space.sample_members`) against a fixed-size vectorised alternative, since the
profile of a rare-target query shows sampling as a large share of the first stage.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import DEFAULT_HOME, RARE_SPACE, dump_json, load_snapshot_from, median, parse_ints, set_threads

__all__ = ["main", "measure", "sample_fixed_size"]


def _time(fn: Callable[[], object], min_seconds: float = 0.2) -> float:
    """Seconds per call, repeating the call until `min_seconds` have passed (at least once)."""
    calls, started = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return elapsed / calls


def sample_fixed_size(
    offsets: np.ndarray, clusters: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The alternative measured here: n members per cluster without replacement via argpartition of a
    (clusters x max size) random-key matrix; padding positions get key 2 so they are never chosen while a
    cluster has enough members. Only the first n keys per row are sorted, not every member of the space."""
    starts = offsets[clusters]
    sizes = offsets[clusters + 1] - starts
    counts = np.minimum(sizes, n)
    width = int(sizes.max())
    keys = rng.random((len(clusters), width))
    keys[np.arange(width)[None, :] >= sizes[:, None]] = 2.0
    if n >= width:
        pick = np.broadcast_to(np.arange(width), keys.shape)
    else:
        pick = np.argpartition(keys, n - 1, axis=1)[:, :n]
    pick = pick[:, : min(n, width)]
    valid = np.arange(pick.shape[1])[None, :] < counts[:, None]
    rows = (starts[:, None] + pick)[valid]
    return rows.astype(np.int64), counts


def measure(home: Path, threads: tuple[int, ...], repeats: int, batch: int, matmul_n: int) -> dict:
    import torch

    from cascade.space import sample_members

    snap = load_snapshot_from(home, RARE_SPACE)
    rng = np.random.default_rng(0)
    x = snap.features[torch.from_numpy(rng.choice(snap.space.num_items, batch, replace=False))]
    a, b = torch.randn(matmul_n, matmul_n), torch.randn(matmul_n, matmul_n)
    out: dict = {"batch": batch, "matmul_n": matmul_n, "repeats": repeats, "threads": {}}
    names = sorted(snap.variants)
    for t in threads:
        set_threads(t)
        rates: dict[str, list[float]] = {"matmul": [], **{n: [] for n in names}}
        with torch.inference_mode():
            for _ in range(repeats):
                rates["matmul"].append(2 * matmul_n**3 / _time(lambda: a @ b) / 1e9)
                for name in names:
                    v = snap.variants[name]
                    sec = _time(lambda v=v: v.model(x))
                    rates[name].append(batch * v.flops.dense_kernel / sec / 1e9)
        mm = median(rates["matmul"])
        out["threads"][str(t)] = {
            "matmul_gflops": mm,
            "variants": {
                n: {
                    "gflops_dense_kernel": median(rates[n]),
                    "fraction_of_matmul": median(rates[n]) / mm,
                    "flops_dense_kernel": snap.variants[n].flops.dense_kernel,
                    "flops_nonzero": snap.variants[n].flops.nonzero,
                    "us_per_item": snap.variants[n].flops.dense_kernel / (median(rates[n]) * 1e3),
                }
                for n in names
            },
        }
        print(f"threads {t}: matmul {mm:.1f} GFLOP/s", flush=True)
        for n, row in out["threads"][str(t)]["variants"].items():
            print(
                f"  {n:9s} {row['gflops_dense_kernel']:7.2f} GFLOP/s = {row['fraction_of_matmul']:.3f} x matmul, "
                f"{row['us_per_item']:.2f} us/item",
                flush=True,
            )

    set_threads(1)
    sampler: dict[str, dict] = {}
    offsets, clusters = snap.space.offsets, np.arange(snap.space.num_clusters)
    for n in (1, 2, 4):
        lib, alt = [], []
        for r in range(repeats):
            lib.append(_time(lambda r=r, n=n: sample_members(offsets, clusters, n, np.random.default_rng(r))) * 1000)
            alt.append(_time(lambda r=r, n=n: sample_fixed_size(offsets, clusters, n, np.random.default_rng(r))) * 1000)
        sampler[str(n)] = {
            "library_ms": median(lib),
            "fixed_size_ms": median(alt),
            "speedup": median(lib) / median(alt),
        }
        print(
            f"sampling {n}/cluster of {len(clusters):,}: library {median(lib):.2f} ms, fixed-size "
            f"{median(alt):.2f} ms ({median(lib) / median(alt):.1f}x)",
            flush=True,
        )
    out["sampler"] = sampler
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, default=DEFAULT_HOME)
    p.add_argument("--threads", default="1", help="torch intra-op thread counts to measure")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=8192, help="items per forward pass")
    p.add_argument("--matmul-n", type=int, default=1024, help="square fp32 matmul size")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    out = measure(args.home, parse_ints(args.threads), args.repeats, args.batch, args.matmul_n)
    if args.out:
        dump_json(args.out, out)
    print(json.dumps(out["sampler"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
