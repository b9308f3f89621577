"""From how many rows a row of a CPU `addmm` no longer depends on the other rows of the call (not a test).

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_gemm_rows

For the shapes of the pair models' scorer (inputs x outputs), on one torch thread: which row counts n give a call
on the first n rows of a random 1,200-row matrix whose rows differ (in any bit) from the same rows of the
1,200-row call, and how many of 400 random windows of 16-700 rows (at random places) differ. This is what
`models.pair.SHARED_GEMM_ROWS` rests on (and `models.inference.MIN_GEMM_ROWS` before it).
"""

from __future__ import annotations

import argparse
import random

import torch

__all__ = ["main"]

SHAPES = ((1408, 256), (2432, 256), (256, 256), (256, 3), (1408, 26), (2432, 26), (26, 3), (1, 3))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1200)
    p.add_argument("--windows", type=int, default=400)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = random.Random(0)
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, 1 thread")
    print("| inputs x outputs | row counts whose rows differ from the large call | windows of >= 16 rows differing |")
    print("|---|---|---|")
    for k, n_out in SHAPES:
        w, b, x = torch.randn(n_out, k), torch.randn(n_out), torch.randn(args.rows, k)
        full = torch.addmm(b, x, w.T)
        bad = [n for n in range(1, args.rows) if not torch.equal(torch.addmm(b, x[:n], w.T), full[:n])]
        windows = 0
        for _ in range(args.windows):
            n = rng.randint(16, min(700, args.rows))
            a = rng.randint(0, args.rows - n)
            windows += not torch.equal(torch.addmm(b, x[a : a + n], w.T), full[a : a + n])
        text = f"{bad[0]}-{bad[-1]} ({len(bad)})" if bad else "none"
        print(f"| {k} x {n_out} | {text} | {windows} of {args.windows} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
