"""Where the cluster reader's stage spends its time (the default for queries by example where a reader is served):
inside the reader's call against around it, and the stage's FLOPs per ms against a same-thread fp32 `torch.mm`
(not a test). The reader's counterpart of `bench_stage_overhead`, which measures the stages of pair models.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_reader_stage --home H --queries 200

Every held-out query of the space (`queries.npz`) is answered by the reader as the service answers it by default
(FAISS's top 10 read, top 30 ranked; k = 10, the service's 200 candidates, seed = the query's position), one at a
time on one torch thread, whether or not the reader's dev check serves it (its speed does not depend on its
weights). Parts: `model` is the reader's own call (`ReaderRanker.query_keys`: the query side and the reader over
every (query, cluster) pair), `posteriors` the grade posteriors from its keys, `cut` the ranking key and the top k,
`flops count` the planned FLOPs counted inside the stage (none since the plan hands the stage its count; the plan
is not part of the stage and not timed), `other` the rest of the stage (sampling members, gathering their cached
keys and values, the retriever's score, the report). The stage's whole time is its own `StageReport.ms`; stage 0
(embedding and FAISS) is timed apart. The reference is a 1024 x 1024 `torch.mm` timed between every block of 10 queries.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.bench_stage_overhead import _install, _matmul_ms, _Timers
from benchmarks.common import dump_json, median, set_threads

__all__ = ["main", "measure", "PARTS"]

PARTS: dict[tuple[str, str], str] = {
    ("models.cluster_reader.ReaderRanker", "query_keys"): "model",
    ("cascade.reader", "grade_log_posteriors"): "posteriors",
    ("cascade.reader", "ranking_key"): "cut",
    ("cascade.reader", "planned_flops"): "flops count",
}
ORDER = ("model", "posteriors", "cut", "flops count", "other")


def measure(home: Path, space: str, queries: int, k: int, candidates: int) -> dict:
    import torch

    from benchmarks.common import load_snapshot_from
    from cascade import reader
    from cascade.plan import plan_reader, target_from_examples

    snap = load_snapshot_from(home, space)
    assert snap.reader is not None, "the space has no cluster reader stored beside it"
    snap.warm()
    qs = snap.queries
    assert qs is not None, "the space ships no held-out queries"
    n = min(queries, len(qs))
    mm_a, mm_b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    timers = _Timers()
    restore = _install(timers, PARTS)
    parts: dict[str, list[float]] = defaultdict(list)
    stage_ms, stage0_ms, mm_ms, flops = [], [], [], []
    try:
        for warm in range(3):  # the first queries pay lazy setup
            reader.reader_answer(snap, target_from_examples(snap, qs.x[warm : warm + 1], candidates), k, warm)
        for i in range(n):
            if i % 10 == 0:
                mm_ms.append(_matmul_ms(mm_a, mm_b))
            t0 = time.perf_counter()
            target = target_from_examples(snap, qs.x[i : i + 1], candidates)
            stage0_ms.append((time.perf_counter() - t0) * 1000.0)
            cost = plan_reader(snap, target, k).stage_flops[0]  # counted once, by the plan, as the service does
            timers.take()
            (report,) = reader.reader_answer(snap, target, k, i, flops=cost).stages
            taken = {p: s * 1000.0 for p, s in timers.take().items()}
            taken["other"] = report.ms - sum(taken.values())
            for p in ORDER:
                parts[p].append(taken.get(p, 0.0))
            stage_ms.append(report.ms)
            flops.append(report.flops)
    finally:
        for owner, name, original in restore:
            setattr(owner, name, original)
    mm_rate = 2 * 1024**3 / median(mm_ms)  # FLOPs per ms
    stage = median(stage_ms)
    per_query_flops = median(flops)
    return {
        "queries": n,
        "matmul_mflop_per_ms": mm_rate / 1e6,
        "stage0_ms": median(stage0_ms),
        "stage_ms": stage,
        "flops": per_query_flops,
        "parts_ms": {p: median(v) for p, v in parts.items()},
        "stage_vs_matmul": per_query_flops / stage / mm_rate,
        "model_vs_matmul": per_query_flops / median(parts["model"]) / mm_rate,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--space", default="default")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--candidates", type=int, default=200)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    set_threads(1)
    r = measure(args.home, args.space, args.queries, args.k, args.candidates)
    print(f"{r['queries']} queries; torch.mm 1024^3: {r['matmul_mflop_per_ms']:.1f} MFLOP/ms (median)")
    print(f"stage 0 (embedding and FAISS): {r['stage0_ms']:.3f} ms (median)")
    head = " | ".join(f"{p} ms" for p in ORDER)
    print(f"| stage | MFLOPs | ms (median) | {head} | stage / matmul | call / matmul |")
    print("|---|---|---|" + "---|" * len(ORDER) + "---|---|")
    print(
        f"| cluster reader | {r['flops'] / 1e6:.1f} | {r['stage_ms']:.3f} | "
        + " | ".join(f"{r['parts_ms'][p]:.3f}" for p in ORDER)
        + f" | {r['stage_vs_matmul']:.2f} | {r['model_vs_matmul']:.2f} |"
    )
    if args.out:
        dump_json(args.out, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
