"""The cluster reader at several widths (how many of FAISS's top clusters it reads), side by side on the same held-out
queries in one run (not a test): recall@1, recall@10, nDCG@10, FLOPs and median milliseconds of each, and every
width's ratios against the widest, which stands for "the dense rerank of FAISS top M" (the reader is the pair
model that reranks here). Every width ranks FAISS's top max(width, pool) by expected gain at the temperature of the
home's stored check (1.0 without one), as served (`cascade.reader`).

    PRUNECASCADE_SPACE=pairbig PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_reader_widths \\
        --home H --widths 10,20,200 --split test
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.common import load_snapshot_from, parse_ints, set_threads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--space", default=os.environ.get("PRUNECASCADE_SPACE", "default"))
    p.add_argument("--widths", type=parse_ints, default=(10, 20, 200), help="comma-separated; the widest is M")
    p.add_argument("--split", choices=("test", "dev"), default="test")
    p.add_argument("--queries", type=int, help="the first N queries of the split (default: all)")
    p.add_argument("--out", type=Path, help="write every row as JSON here")
    args = p.parse_args(argv)
    set_threads(1)
    from cascade.config import ReaderChoice
    from cascade.evaluation import example_queries, graded_metrics
    from cascade.plan import plan_reader
    from cascade.queries import cluster_grades
    from cascade.side_by_side import Method, side_by_side, stages

    snapshot = load_snapshot_from(args.home, args.space)
    if snapshot.reader is None:
        raise SystemExit(f"{args.home} holds no cluster reader beside its space {args.space!r}")
    stored = snapshot.config.reader
    base = stored or ReaderChoice(served=False, sha256=snapshot.reader.sha256)

    def reader_at(width: int) -> Method:
        at = replace(
            snapshot,
            config=snapshot.config.model_copy(update={"reader": base.model_copy(update={"candidates": width})}),
        )
        return Method(f"reader top {width}", plan=lambda _snap, target, k: plan_reader(at, target, k))

    widths = sorted(set(args.widths))
    methods = [stages("faiss", []), *(reader_at(w) for w in widths)]
    held_out = example_queries(snapshot, max(*widths, base.pool, 10), args.queries, args.split)
    rounds = side_by_side(snapshot, held_out, methods, 10, (0,), reference=None, seed_per_query=True)
    labels = snapshot.space.cluster_labels
    rows: dict[str, list[tuple[float, ...]]] = {m.name: [] for m in methods}
    for r in rounds:
        grades = cluster_grades(labels, r.query.info["cluster"], r.query.info["label"], len(r.target.utility))
        for name in rows:
            rec = r[name]
            rows[name].append((*graded_metrics(rec.cluster_ids, grades, r.target.utility, 10), rec.flops, rec.ms))
    summary = {}
    for name, values in rows.items():
        t = np.asarray(values, dtype=np.float64)
        summary[name] = {
            "recall_at_1": float(t[:, 0].mean()),
            "recall_at_10": float(t[:, 1].mean()),
            "ndcg_at_10": float(t[:, 2].mean()),
            "flops": float(t[:, 3].mean()),
            "ms_median": float(np.median(t[:, 4])),
        }
    widest = summary[f"reader top {widths[-1]}"]
    print(
        f"{len(rounds)} {args.split} queries, space {args.space}, pool {base.pool}, temperature {base.temperature:g}"
        f"{'' if stored else ' (no stored check)'}; ratios against reader top {widths[-1]}"
    )
    print(f"{'':16} {'R@1':>6} {'R@10':>6} {'nDCG@10':>8} {'MFLOPs':>9} {'ms':>8} {'x FLOPs':>8} {'x time':>7}")
    for name, s in summary.items():
        ratios = f"{widest['flops'] / s['flops']:8.1f} {widest['ms_median'] / s['ms_median']:7.1f}"
        print(
            f"{name:16} {s['recall_at_1']:6.3f} {s['recall_at_10']:6.3f} {s['ndcg_at_10']:8.3f} "
            f"{s['flops'] / 1e6:9.1f} {s['ms_median']:8.2f} {ratios}"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"queries": len(rounds), "split": args.split, "rows": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
