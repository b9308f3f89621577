"""`prunecascade evaluate`: the default (or a given) cascade against the dense exhaustive oracle."""

from __future__ import annotations

import argparse
import json

from service.commands.common import add_home, settings_from

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="recall, FLOPs and time of a cascade vs the dense model")
    add_home(p)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3, help="queries per label")
    p.add_argument("--stages", help='JSON list of stages, e.g. \'[{"variant": "dense", "samples": 10}]\'')
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument(
        "--examples",
        type=int,
        default=0,
        metavar="N",
        help="instead: N held-out queries by example, the pair cascade against FAISS only and the oracle",
    )
    p.add_argument(
        "--candidates",
        type=int,
        help="with --examples: M, the clusters stage 0 proposes (default: the default cascade's, else 200)",
    )
    p.add_argument(
        "--split",
        choices=("test", "dev", "all"),
        default="test",
        help="with --examples: which held-out queries (test: never tuned on; every second query is a dev query)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from cascade.config import CONFIG_FILE, CascadeConfig, Stage
    from cascade.evaluation import evaluate_label_queries
    from cascade.plan import plan_target, target_from_label
    from cascade.snapshot import load_snapshot
    from models.registry import ModelRegistry

    torch.set_num_threads(args.threads)
    settings = settings_from(args)
    snapshot = load_snapshot(
        ModelRegistry(settings.registry_dir), settings.space_dir, CascadeConfig.load(settings.home / CONFIG_FILE)
    )
    stages = tuple(Stage.model_validate(s) for s in json.loads(args.stages)) if args.stages else None
    if args.examples > 0:
        return _examples(snapshot, args, stages)
    r = evaluate_label_queries(snapshot, args.k, stages, tuple(range(args.seeds)))
    space = snapshot.space
    used = plan_target(snapshot, target_from_label(snapshot, space.labels_known[0]), args.k, stages).stages
    print(f"space: {space.num_items} items in {space.num_clusters} clusters; purity {space.meta.get('purity', 1):.3f}")
    print("cascade: " + " -> ".join(f"{s.variant}(n={s.samples}, keep={s.keep}, {s.aggregator})" for s in used))
    print(f"queries: {r.queries} label queries, k={r.k}")
    print(f"recall@{r.k}     cascade {r.recall:.4f}   oracle {r.oracle_recall:.4f}")
    print(f"nDCG@{r.k}       cascade {r.ndcg:.4f}")
    print(f"agreement@{r.k}  {r.agreement:.4f}")
    print(f"FLOPs/query    cascade {r.flops:,.0f}   oracle {r.oracle_flops:,.0f}   ratio {r.flops_ratio:.1f}x fewer")
    print(f"median ms      cascade {r.ms:.2f}   oracle {r.oracle_ms:.2f}   ratio {r.time_ratio:.1f}x faster")
    return 0


def _examples(snapshot: object, args: argparse.Namespace, stages: tuple | None) -> int:
    from cascade.evaluation import evaluate_example_queries
    from cascade.reader import serves

    methods = {"cascade" if stages is not None else "default": stages, "faiss only": ()}
    m = args.candidates or snapshot.config.pair_candidates or 200  # type: ignore[attr-defined]
    reports = evaluate_example_queries(
        snapshot,  # type: ignore[arg-type]
        methods,
        k=args.k,
        candidates=m,
        queries=args.examples,  # type: ignore[arg-type]
        split=args.split,
    )
    oracle = reports["oracle"]
    print(f"{oracle.queries} held-out {args.split} queries by example, k={args.k}, M={m}")
    if stages is None:
        config = snapshot.config  # type: ignore[attr-defined]
        what = (
            f"the cluster reader reading FAISS top {config.reader.candidates}, ranking top {config.reader.pool} "
            f"by expected gain"
            if serves(snapshot)  # type: ignore[arg-type]
            else f"the default pair cascade {[s.variant for s in config.pair_stages or ()] or '(FAISS alone)'}"
        )
        print(f"default: {what}")
    print(f"{'':12s} {'R@1':>6s} {'R@k':>6s} {'nDCG@10':>8s} {'agree@10':>8s} {'FLOPs':>14s} {'median ms':>10s}")
    for name, r in reports.items():
        print(
            f"{name:12s} {r.recall_at_1:6.3f} {r.recall_at_k:6.3f} {r.ndcg_at_10:8.3f} {r.agreement_at_10:8.3f} "
            f"{r.flops:14,.0f} {r.ms:10.2f}"
        )
    return 0
