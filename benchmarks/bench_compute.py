"""Compute efficiency: GFLOP/s of each variant's forward pass against a large matmul, and the chunk size of the
serving forward pass (`models.inference.forward_chunked`) against one pass over the whole batch (not a test).

    .venv/bin/python -m benchmarks.bench_compute --home /tmp/bench-home --threads 1 --repeats 7 \
        --budgets-mib 0.5,1,2,4,8,16 --out var/bench/compute.json

Why: the cascade's wall-time ratio can only follow its FLOPs ratio if the networks run near the machine's
attainable rate, and the rate of small convolutions depends on whether a chunk's activations stay in cache.
Per thread count, every repeat times the matmul and every (variant, chunking) back to back; efficiencies are
medians of GFLOP/s over the median of the matmul's. `--batch` defaults to 20,000 items: the first stage of a
rare-target query with 2 samples from each of 10,000 clusters.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import DEFAULT_HOME, RARE_SPACE, dump_json, load_snapshot_from, median, parse_ints, set_threads
from benchmarks.common import seconds_per_call as _time

__all__ = ["main", "measure"]

WHOLE = "whole batch"


def _parse_floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def measure(
    home: Path, threads: tuple[int, ...], repeats: int, batch: int, matmul_n: int, budgets_mib: tuple[float, ...]
) -> dict:
    import numpy as np
    import torch

    from models.inference import chunk_rows, forward_chunked

    snap = load_snapshot_from(home, RARE_SPACE)
    rows = np.random.default_rng(0).choice(snap.space.num_items, batch, replace=batch > snap.space.num_items)
    x = snap.features[torch.from_numpy(rows)]
    a, b = torch.randn(matmul_n, matmul_n), torch.randn(matmul_n, matmul_n)
    names = sorted(snap.variants)
    chunkings: dict[str, dict[str, int]] = {
        n: {
            WHOLE: batch,
            **{f"{m:g} MiB": chunk_rows(snap.variants[n].model.spec, int(m * 2**20)) for m in budgets_mib},
        }
        for n in names
    }
    out: dict = {"batch": batch, "matmul_n": matmul_n, "repeats": repeats, "chunk_rows": chunkings, "threads": {}}
    for t in threads:
        set_threads(t)
        matmul: list[float] = []
        us: dict[str, dict[str, list[float]]] = {n: {c: [] for c in chunkings[n]} for n in names}
        with torch.inference_mode():
            for _ in range(repeats):
                matmul.append(2 * matmul_n**3 / _time(lambda: a @ b) / 1e9)
                for name in names:
                    model = snap.variants[name].model
                    for label, rows_per_chunk in chunkings[name].items():
                        sec = _time(lambda m=model, c=rows_per_chunk: forward_chunked(m, x, c))
                        us[name][label].append(sec / batch * 1e6)
        mm = median(matmul)
        table: dict[str, dict] = {}
        print(f"threads {t}: matmul {mm:.1f} GFLOP/s; us/item per chunking (rows per chunk)", flush=True)
        for name in names:
            flops = snap.variants[name].flops.dense_kernel
            per = {label: median(v) for label, v in us[name].items()}
            best = min(per, key=per.get)
            table[name] = {
                "flops_dense_kernel": flops,
                "flops_nonzero": snap.variants[name].flops.nonzero,
                "us_per_item": per,
                "best": best,
                "gflops_whole": flops / per[WHOLE] / 1e3,
                "gflops_best": flops / per[best] / 1e3,
                "fraction_of_matmul_whole": flops / per[WHOLE] / 1e3 / mm,
                "fraction_of_matmul_best": flops / per[best] / 1e3 / mm,
                "speedup_best_over_whole": per[WHOLE] / per[best],
            }
            cells = ", ".join(f"{label} ({chunkings[name][label]}): {v:.2f}" for label, v in per.items())
            print(f"  {name:9s} {cells}", flush=True)
            print(
                f"  {'':9s} best {best}: {table[name]['gflops_best']:.1f} GFLOP/s = "
                f"{table[name]['fraction_of_matmul_best']:.3f} x matmul, {table[name]['speedup_best_over_whole']:.2f}x "
                f"the whole batch",
                flush=True,
            )
        out["threads"][str(t)] = {"matmul_gflops": mm, "variants": table}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, default=DEFAULT_HOME)
    p.add_argument("--threads", default="1", help="torch intra-op thread counts to measure")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=20_000, help="items per forward call")
    p.add_argument("--matmul-n", type=int, default=1024, help="square fp32 matmul size")
    p.add_argument("--budgets-mib", default="1,4,16", help="activation budgets for `chunk_rows`, in MiB")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    out = measure(
        args.home, parse_ints(args.threads), args.repeats, args.batch, args.matmul_n, _parse_floats(args.budgets_mib)
    )
    if args.out:
        dump_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
