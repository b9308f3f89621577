"""`prunecascade tune`: measure plans of the pair cascade on the space's dev queries, choose the cheapest that
meets a quality target (or the best within a FLOPs or latency budget), store it as the home's default with its
record, and report it on the test queries. A running server adopts it with `POST /v1/admin/reload` (or tune
through it: `POST /v1/admin/tune`)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from service.commands.common import add_home, settings_from

__all__ = ["register", "run", "target_from_args"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="choose the default pair cascade from measurements on dev queries",
        description="Measure candidate plans of the pair cascade (stage 0's M, variants, samples, keeps, "
        "aggregators, number of stages) on the space's dev queries, choose the cheapest that meets the target, "
        "and store it as the home's default cascade with its provenance and Pareto front. Quality is measured "
        "relative to the dense rerank of FAISS top M and against the truth; the chosen plan is then reported on "
        "the test queries, which the tuning never saw.",
    )
    add_home(p)
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--quality",
        type=float,
        help="relative nDCG@10 to the dense rerank that the plan must reach, by its lower confidence bound "
        "over the dev queries (default 0.99)",
    )
    target.add_argument("--flops", type=float, help="instead: the best plan within this many FLOPs per query")
    target.add_argument("--ms", type=float, help="instead: the best plan within this median latency per query")
    p.add_argument("--confidence", type=float, default=0.95, help="of the lower bound (one-sided bootstrap)")
    p.add_argument(
        "--candidates",
        type=int,
        help="the dense rerank's M, the largest M a plan may use (default: the server's example_candidates)",
    )
    p.add_argument("--dev-queries", type=int, help="use only the first N dev queries (default: all)")
    p.add_argument("--max-plans", type=int, default=60, help="plans measured at most")
    p.add_argument("--max-seconds", type=float, default=150.0, help="no refinement round starts after this")
    p.add_argument("--oracle-queries", type=int, default=0, help="also run the exhaustive oracle on N dev queries")
    p.add_argument("--no-test", action="store_true", help="skip the report on the test queries")
    p.add_argument("--dry-run", action="store_true", help="measure and report, but leave cascade.json unchanged")
    p.add_argument(
        "--no-faiss-guard",
        action="store_true",
        help="let plans lose to FAISS alone (measures the search where the reranker loses); implies --dry-run",
    )
    p.add_argument("--out", type=Path, help="write tuning.json, plans.csv and front.png (the plot) here")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal)",
    )
    p.set_defaults(func=run)


def target_from_args(args: argparse.Namespace):
    from cascade.tuning_record import TuneTarget

    if args.flops is not None:
        return TuneTarget(kind="flops", value=args.flops, confidence=args.confidence)
    if args.ms is not None:
        return TuneTarget(kind="ms", value=args.ms, confidence=args.confidence)
    quality = 0.99 if args.quality is None else args.quality
    if not 0 < quality <= 1:
        raise ValueError(f"--quality is a relative nDCG@10 in (0, 1], got {quality}")
    return TuneTarget(kind="quality", value=quality, confidence=args.confidence)


def run(args: argparse.Namespace) -> int:
    import torch

    from cascade.config import CONFIG_FILE, CascadeConfig
    from cascade.snapshot import load_snapshot
    from cascade.tuner import TuneOptions, save_tuned, tune
    from models.registry import ModelRegistry

    torch.set_num_threads(args.threads)
    settings = settings_from(args)
    config = CascadeConfig.load(settings.home / CONFIG_FILE)
    snapshot = load_snapshot(ModelRegistry(settings.registry_dir), settings.space_dir, config)
    options = TuneOptions(
        target=target_from_args(args),
        candidates=args.candidates or settings.example_candidates,
        dev_queries=args.dev_queries,
        test=not args.no_test,
        max_plans=args.max_plans,
        max_seconds=args.max_seconds,
        oracle_queries=args.oracle_queries,
        progress=args.progress,
        faiss_guard=not args.no_faiss_guard,
    )
    result = tune(snapshot, options)
    record = result.record
    print(f"target: {record.target.describe()}")
    print(f"{'plan':78s} {'rel nDCG':>8s} {'low':>6s} {'agree':>6s} {'R@1':>6s} {'nDCG':>6s} {'FLOPs':>14s} {'ms':>7s}")
    for p in record.front:
        mark = "*" if p.name == record.chosen.name else " "
        print(
            f"{mark}{p.name:77s} {p.rel_ndcg:8.4f} {p.rel_ndcg_low:6.3f} {p.agreement:6.3f} {p.recall_at_1:6.3f} "
            f"{p.ndcg:6.3f} {p.flops:14,.0f} {p.ms:7.2f}"
        )
    for name, p in (("FAISS only", record.faiss_only), ("dense rerank", record.dense_rerank)):
        print(f" [{name}] R@1 {p.recall_at_1:.3f} nDCG@10 {p.ndcg:.3f} FLOPs {p.flops:,.0f} ms {p.ms:.2f}")
    print(f"chosen: {record.chosen.name}\n  {record.reason}")
    print("tuner cost: " + ", ".join(f"{k} {v:g}" for k, v in record.tuner.items()))
    if record.gains_check is not None:
        print(f"gains: {record.gains_check['verdict']}")
    if record.test is not None:
        print("on the test queries (never tuned on):")
        for name, row in record.test.items():
            print(f"  {name:13s} " + "  ".join(f"{k} {v:,.4g}" for k, v in row.items()))
    stored = not args.dry_run and not args.no_faiss_guard
    if args.out is not None:
        _write_out(args.out, result, stored)
    if stored:
        save_tuned(settings.home, config, result)
        print(
            f"stored as the default pair cascade in {settings.home / CONFIG_FILE} "
            "(a running server: POST /v1/admin/reload)"
        )
    return 0


def _write_out(out: Path, result, stored: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plans = [m.point() for m in result.measured]
    (out / "tuning.json").write_text(
        json.dumps(
            {
                "record": result.record.model_dump(mode="json"),
                "stored": stored,  # False: a dry run or the FAISS guard off; the chosen plan is not served
                "plans": [p.model_dump(mode="json") for p in plans],
            },
            indent=2,
        )
    )
    with (out / "plans.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        fields = ["name", "candidates", "rel_ndcg", "rel_ndcg_low", "agreement", "recall_at_1", "ndcg", "flops", "ms"]
        writer.writerow(fields)
        for p in plans:
            writer.writerow([getattr(p, k) for k in fields])
    try:
        from service.tuning_plot import plot_front

        print(f"plot: {plot_front(result.record, plans, out, served=stored)}")
    except ImportError:
        print("no plot: matplotlib is not installed (pip install 'prunecascade[bench]')")
