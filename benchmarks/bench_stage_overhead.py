"""Where a stage's time goes: inside the model call against around it (sampling, gathering the members' cached
item inputs, aggregation, the cut), and each stage's FLOPs per ms against a same-thread fp32 `torch.mm` (not a
test).

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_stage_overhead \
        --home /work/home-default --queries 200 --out var/bench/stage_overhead.json

Every held-out query of the space (`queries.npz`, never items) runs the space's default cascade of pair models
(k = 10, the service's 200 candidates, its own seed), one at a time, on one torch thread. The engine's helpers
are wrapped with timers (`PARTS`: which helper counts as which part); a stage's whole time is the engine's own
`StageReport.ms`, and `other` is what no wrapped helper accounts for (the stage report, the FLOPs count, loop
bookkeeping). With `--batch B` the queries run B at a time through `cascade.stage_loop.run_stages_many` (a
checkout without it runs one at a time), and a stage's time is the batch's time shared among its B queries.

The reference: a 1024 x 1024 fp32 `torch.mm` timed on the same thread between every block of 10 queries
(median over the run), 2 * 1024^3 FLOPs per product. A stage's efficiency is its FLOPs (the engine's count,
`StageReport.flops`: the model on its path, the fold, the aggregation) per ms of its whole time over the
matmul's FLOPs per ms; the model call's own rate is shown beside it.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

from benchmarks.common import dump_json, median, set_threads

__all__ = ["main", "measure", "PARTS"]

# (object path, attribute) -> part. The model call is scoring proper: preparing the query (its trunk and the
# fold) and the scorer over the members' item inputs.
PARTS: dict[tuple[str, str], str] = {
    ("cascade.engine", "sample_members"): "sampling",
    ("cascade.engine", "_extend_members"): "sampling",
    ("cascade.snapshot.Snapshot", "item_inputs"): "gather",
    ("cascade.engine", "_score_members"): "model",
    ("cascade.engine", "_merge_members"): "aggregation",
    ("cascade.engine", "_aggregate_examples"): "aggregation",
    ("cascade.engine", "ranking_key"): "cut",
    ("cascade.engine", "_keep_groups"): "cut",
    ("cascade.engine", "_aggregator_flops"): "other",
    # the batched stage loop (cascade/stage_loop.py)
    ("cascade.stage_loop", "sample_members_many"): "sampling",
    ("cascade.stage_loop", "_extend_many"): "sampling",
    ("cascade.stage_loop", "prepare_for"): "model",
    ("cascade.stage_loop", "prepare_many"): "model",
    ("cascade.stage_loop", "score_many"): "model",
    ("cascade.stage_loop", "aggregate_many"): "aggregation",
    ("cascade.stage_loop", "log_mean_posteriors"): "aggregation",
    ("cascade.stage_loop", "ranking_keys"): "cut",
    ("cascade.stage_loop", "top_per_query"): "cut",
    # the same parts under their names in older checkouts (a `before` tree)
    ("cascade.stage_loop", "_aggregate_units"): "aggregation",
    ("cascade.stage_loop", "_combine_examples"): "aggregation",
    ("cascade.stage_loop", "_ranking_keys"): "cut",
    ("cascade.stage_loop", "_top"): "cut",
    ("cascade.stage_loop", "_group_positions"): "cut",
}
ORDER = ("model", "sampling", "gather", "aggregation", "cut", "other")


class _Timers:
    """Seconds per part since the last `take()`; wrapped helpers add to it (no nesting among them)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def take(self) -> dict[str, float]:
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out

    def wrap(self, fn, part: str):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - t0

        return timed


def _install(timers: _Timers, parts: Mapping[tuple[str, str], str] = PARTS) -> list[tuple[object, str, object]]:
    """Wrap every helper of `parts` that exists in this version of the code; returns what to restore."""
    import importlib

    restore = []
    for (where, name), part in parts.items():
        module_name, _, cls = where.rpartition(".") if where[where.rfind(".") + 1 :][:1].isupper() else (where, "", "")
        try:
            owner: object = importlib.import_module(module_name)
        except ImportError:  # a module this checkout does not have
            continue
        if cls:
            owner = getattr(owner, cls)
        original = getattr(owner, name, None)
        if original is None:
            continue
        restore.append((owner, name, original))
        setattr(owner, name, timers.wrap(original, part))
    return restore


def _stage_loop():
    """The batched stage loop, where this checkout has one (None before it existed)."""
    try:
        from cascade import stage_loop
    except ImportError:
        return None
    return stage_loop


def _target_from_examples(snap, x, candidates: int):
    try:
        from cascade.plan import target_from_examples
    except ImportError:
        from cascade.engine import target_from_examples  # type: ignore[attr-defined,no-redef]
    return target_from_examples(snap, x, candidates)


def _run_block(snap, targets: list, seeds: list[int], k: int) -> list:
    """The default cascade for each target: one batch through the batched stage loop where there is one,
    else one `run_cascade` per target."""
    loop = _stage_loop()
    if loop is None:
        try:
            from cascade.plan import run_cascade
        except ImportError:
            from cascade.engine import run_cascade  # type: ignore[attr-defined,no-redef]

        return [run_cascade(snap, t, k, None, seed=s) for t, s in zip(targets, seeds, strict=True)]
    try:
        from cascade.plan import resolve_stages
    except ImportError:
        from cascade.engine import resolve_stages  # type: ignore[attr-defined,no-redef]
    jobs = [loop.StageJob(t, k, resolve_stages(snap, t, k, None), s) for t, s in zip(targets, seeds, strict=True)]
    return loop.run_stages_many(snap, jobs)


def _matmul_ms(a, b, repeats: int = 5) -> float:
    import torch

    times = []
    with torch.inference_mode():
        a @ b
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append((time.perf_counter() - t0) * 1000.0)
    return median(times)


def measure(home: Path, space: str, queries: int, k: int, candidates: int, batch: int) -> dict:
    import torch

    from benchmarks.common import load_snapshot_from
    from cascade import engine

    snap = load_snapshot_from(home, space)
    snap.warm()
    qs = snap.queries
    assert qs is not None, "the space ships no held-out queries"
    n = min(queries, len(qs))
    mm_a, mm_b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    mm_flops = 2 * 1024**3
    timers = _Timers()
    restore = _install(timers)
    rows: dict[int, list[dict]] = defaultdict(list)  # stage index -> per query
    stage0_ms: list[float] = []
    mm_ms: list[float] = []
    hooked = [m for m in (engine, _stage_loop()) if m is not None]
    try:
        for warm in range(3):  # first queries pay lazy setup (fold plans, caches)
            t = _target_from_examples(snap, qs.x[warm : warm + 1], max(k, candidates))
            _run_block(snap, [t], [warm], k)
        timers.take()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        mm_cpu = mm_wall = 0.0  # the reference products' own time, taken out of the per-query figures
        for start in range(0, n, batch):
            if start // batch % max(1, 10 // batch) == 0:
                c0, w0 = time.process_time(), time.perf_counter()
                mm_ms.append(_matmul_ms(mm_a, mm_b))
                mm_cpu += time.process_time() - c0
                mm_wall += time.perf_counter() - w0
            block = range(start, min(n, start + batch))
            targets = []
            for i in block:
                t0 = time.perf_counter()
                targets.append(_target_from_examples(snap, qs.x[i : i + 1], max(k, candidates)))
                stage0_ms.append((time.perf_counter() - t0) * 1000.0)
            timers.take()
            parts_by_stage: list[dict[str, float]] = []
            originals = [m.StageReport for m in hooked]

            def report_hook(*args, _orig=originals[0], _parts=parts_by_stage, **kwargs):
                _parts.append(timers.take())  # the first report of a stage takes its timers, the others none
                return _orig(*args, **kwargs)

            for m in hooked:
                m.StageReport = report_hook
            try:
                results = _run_block(snap, targets, [1000 + i for i in block], k)
            finally:
                for m, original in zip(hooked, originals, strict=True):
                    m.StageReport = original
            stages_run = len(results[0].stages)
            for j in range(stages_run):
                parts: dict[str, float] = defaultdict(float)
                for got in parts_by_stage[j * len(results) : (j + 1) * len(results)]:
                    for p, v in got.items():
                        parts[p] += v
                ms = {p: 1000.0 * v for p, v in parts.items()}
                whole = results[0].stages[j].ms  # the batch's time (every query of it reports the same)
                ms["other"] = whole - sum(v for p, v in ms.items() if p != "other")
                flops = sum(r.stages[j].flops for r in results)
                rows[j].append(
                    {
                        "variant": results[0].stages[j].variant,
                        "flops": flops,
                        "ms": whole,
                        "parts_ms": ms,
                        "queries": len(results),
                    }
                )
        cpu_ms = (time.process_time() - cpu0 - mm_cpu) * 1000.0
        wall_ms = (time.perf_counter() - wall0 - mm_wall) * 1000.0
    finally:
        for owner, name, original in restore:
            setattr(owner, name, original)
    mm = median(mm_ms)
    mm_rate = mm_flops / mm  # FLOPs per ms
    stages = []
    for j in sorted(rows):
        r = rows[j]
        count = sum(x["queries"] for x in r)
        total_ms = sum(x["ms"] for x in r)
        total_flops = sum(x["flops"] for x in r)
        part_ms = {p: sum(x["parts_ms"].get(p, 0.0) for x in r) / count for p in ORDER}  # per query
        model_ms = sum(x["parts_ms"].get("model", 0.0) for x in r)
        stages.append(
            {
                "stage": j + 1,
                "variant": r[0]["variant"],
                "queries": count,
                "ms_mean": total_ms / count,  # per query: a batch's time shared among its queries
                "parts_ms_mean": part_ms,
                "outside_fraction": 1.0 - model_ms / total_ms,
                "mflops_mean": total_flops / count / 1e6,
                "mflop_per_ms_whole": total_flops / total_ms / 1e6,
                "mflop_per_ms_model": total_flops / model_ms / 1e6 if model_ms else float("nan"),
                "fraction_of_mm_whole": total_flops / total_ms / mm_rate,
                "fraction_of_mm_model": total_flops / model_ms / mm_rate if model_ms else float("nan"),
            }
        )
    return {
        "space": space,
        "batch": batch,
        "queries": n,
        "k": k,
        "candidates": candidates,
        "matmul_ms_median": mm,
        "matmul_mflop_per_ms": mm_rate / 1e6,
        "stage0_ms_median": median(stage0_ms),
        # per query, everything (stage 0, the stages, the timers): CPU time is what the process itself spent,
        # so it holds where other processes take the cores (wall time does not)
        "cpu_ms_per_query": cpu_ms / n,
        "wall_ms_per_query": wall_ms / n,
        "stages": stages,
    }


def _print(out: dict) -> None:
    print(
        f"{out['queries']} held-out queries, k={out['k']}, {out['candidates']} candidates; 1024^2 fp32 mm: "
        f"{out['matmul_ms_median']:.2f} ms = {out['matmul_mflop_per_ms']:.1f} MFLOP/ms; stage 0 (embed + FAISS) "
        f"median {out['stage0_ms_median']:.2f} ms; batch {out['batch']}: {out['cpu_ms_per_query']:.2f} CPU ms and "
        f"{out['wall_ms_per_query']:.2f} wall ms per query (all of it)"
    )
    print(
        "| stage | variant | ms (mean) | model | sampling | gather | aggregation | cut | other | outside "
        "| MFLOP | MFLOP/ms whole | x mm whole | x mm model call |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in out["stages"]:
        p = s["parts_ms_mean"]
        print(
            f"| {s['stage']} | {s['variant']} | {s['ms_mean']:.3f} | "
            + " | ".join(f"{p[x]:.3f}" for x in ORDER)
            + f" | {100 * s['outside_fraction']:.0f}% | {s['mflops_mean']:.1f} | {s['mflop_per_ms_whole']:.1f} | "
            f"{s['fraction_of_mm_whole']:.2f} | {s['fraction_of_mm_model']:.2f} |"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, default=Path("/work/home-default"))
    p.add_argument("--space", default="default")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--candidates", type=int, default=200, help="stage 0's M (the service's default)")
    p.add_argument("--batch", type=int, default=1, help="queries per batch (1: one at a time)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    set_threads(1)
    out = measure(args.home, args.space, args.queries, args.k, args.candidates, args.batch)
    _print(out)
    if args.out:
        dump_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
