"""Queries by example on a space of >= 100,000 items: the cascade of pair models against the three answers a
user could pick instead, side by side in one run (not a test).

    .venv/bin/python -m benchmarks.bench_pair prepare --home var --name pairbig --prototypes 10000
    .venv/bin/python -m benchmarks.bench_pair run --home var --space pairbig --queries 200 \
        --out var/bench/pair_big.json

(a) the oracle: the dense pair model on every item, Bayes over all members of every cluster;
(b) FAISS only: the k clusters nearest to the query in the bi-encoder's embedding (`stages: []`);
(c) retrieve and rerank: FAISS top M, then the dense pair model on every member of those M clusters;
(d) cascades of pruned pair models over the same M candidates (a small grid, plus the service default).
Per query every method runs once, in turn, so machine noise hits all alike; times are medians.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace
from itertools import product
from pathlib import Path

from benchmarks.common import dump_json, load_snapshot_from, set_threads

__all__ = ["main", "prepare", "methods_grid"]


def prepare(home: Path, name: str, prototypes: int, views: int, queries: int, seed: int) -> None:
    """A prototype space under HOME/spaces/NAME, embedded with the default space's bi-encoder (the index is
    only valid for the embedding it was built with), with its held-out queries."""
    from cascade.bootstrap_config import PairConfig
    from cascade.embedding import EmbeddingIndex
    from cascade.index import ClusterIndex
    from cascade.queries import QuerySet
    from cascade.space import Space, build_space
    from models.prototypes import make_prototype_set, make_queries

    default_dir = home / "spaces" / "default"
    embedding = EmbeddingIndex.load(default_dir)
    if embedding is None:
        raise SystemExit(f"{default_dir} has no bi-encoder: run `prunecascade bootstrap --home {home}` first")
    prior = Space.load(default_dir).prior
    config = replace(PairConfig().space, num_prototypes=prototypes, views=views, seed=seed)
    t0 = time.perf_counter()
    views_set = make_prototype_set(config, "space")
    meta = {
        "id": f"mnist1d-prototypes-s{seed}-k{prototypes}-m{views}",
        "dataset": "mnist1d-prototypes",
        "clusters": "prototypes",
        "cluster_size": views,
        "jitter": config.jitter,
        "seed": seed,
    }
    space = build_space(views_set.x, views_set.y, prior, views_set.cluster, meta)
    xq, cq, yq = make_queries(config, queries, seed=seed)
    out = home / "spaces" / name
    out.mkdir(parents=True, exist_ok=True)
    QuerySet(x=xq, cluster=cq, label=yq).save(out)
    ClusterIndex.build(space).save(out)
    EmbeddingIndex.build(embedding.encoder, space.features, space.offsets).save(out)
    space.save(out)
    print(
        f"{out}: {space.num_items:,} items in {space.num_clusters:,} clusters, {queries} queries "
        f"({time.perf_counter() - t0:.1f} s)",
        flush=True,
    )


def methods_grid(
    dense: str,
    widest: int,
    firsts: tuple[str, ...],
    samples: tuple[int, ...],
    keeps: tuple[int, ...],
    lasts: tuple[int, ...] | int,
    extra: tuple[str, ...] = (),
) -> dict[str, list[dict] | None]:
    """(b), (c), the default cascade, the grid of two-stage cascades (first stage x samples x keep x the dense
    stage's samples) and `extra` cascades written `variant/samples[/keep[/aggregator]],...` (keep may be empty)."""
    methods: dict[str, list[dict] | None] = {
        "faiss only": [],
        "retrieve+rerank (dense, every member)": [{"variant": dense, "samples": widest}],
        "default cascade": None,
    }
    for first, n, keep, last in product(firsts, samples, keeps, (lasts,) if isinstance(lasts, int) else lasts):
        methods[f"{first}/n{n}/keep{keep} -> {dense}/n{last}"] = [
            {"variant": first, "samples": n, "keep": keep},
            {"variant": dense, "samples": last},
        ]
    for text in extra:
        stages = []
        for part in text.split(","):
            fields = part.strip().split("/")
            stage: dict = {"variant": fields[0], "samples": int(fields[1])}
            if len(fields) > 2 and fields[2]:
                stage["keep"] = int(fields[2])
            if len(fields) > 3:
                stage["aggregator"] = fields[3]
            stages.append(stage)
        name = " -> ".join(
            f"{st['variant']}/n{st['samples']}"
            + (f"/keep{st['keep']}" if "keep" in st else "")
            + (f"/{st['aggregator']}" if "aggregator" in st else "")
            for st in stages
        )
        methods[name] = stages
    return methods


def _commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(args: argparse.Namespace) -> dict:
    from cascade.config import Stage
    from cascade.evaluation import evaluate_example_queries

    set_threads(args.threads)
    snapshot = load_snapshot_from(args.home, args.space)
    dense = snapshot.config.pair_dense
    assert dense is not None, "the home has no pair models"
    widest = int(snapshot.space.sizes.max())
    grid = methods_grid(
        dense,
        widest,
        tuple(args.firsts.split(",")),
        tuple(int(v) for v in args.samples.split(",")),
        tuple(int(v) for v in args.keeps.split(",")),
        tuple(int(v) for v in str(args.last_samples).split(",")),
        tuple(args.extra or ()),
    )
    methods = {n: None if s is None else tuple(Stage.model_validate(x) for x in s) for n, s in grid.items()}
    t0 = time.perf_counter()
    # the split is taken once, by evaluate_example_queries (cascade.queries.SPLIT_RULE: dev = odd positions)
    reports = evaluate_example_queries(
        snapshot, methods, k=args.k, candidates=args.candidates, queries=args.queries, split=args.split
    )
    oracle = reports["oracle"]
    rerank = reports["retrieve+rerank (dense, every member)"]
    space = snapshot.space
    print(
        f"space {space.meta.get('id')}: {space.num_items:,} items, {space.num_clusters:,} clusters; "
        f"{oracle.queries} held-out queries, M = {args.candidates}, k = {args.k}, {args.threads} thread(s); "
        f"{time.perf_counter() - t0:.0f} s"
    )
    header = (
        f"{'method':64s} {'R@1':>6s} {'R@10':>6s} {'nDCG@10':>7s} {'agree@10':>8s} {'FLOPs/query':>14s} "
        f"{'x fewer':>8s} {'ms (med)':>9s} {'x faster':>8s} {'vs (c)':>7s}"
    )
    print(header)
    rows = []
    for name, r in reports.items():
        row = {
            **asdict(r),
            "flops_ratio": oracle.flops / r.flops if r.flops else float("inf"),
            "time_ratio": oracle.ms / r.ms,
            "vs_rerank_time": rerank.ms / r.ms,
            "stages": grid.get(name),
        }
        rows.append(row)
        print(
            f"{name:64s} {r.recall_at_1:6.3f} {r.recall_at_k:6.3f} {r.ndcg_at_10:7.3f} {r.agreement_at_10:8.3f} "
            f"{r.flops:14,.0f} {row['flops_ratio']:8.1f} {r.ms:9.2f} {row['time_ratio']:8.1f} "
            f"{row['vs_rerank_time']:7.2f}"
        )
    caches = [
        {"key": e.key, "bytes": e.nbytes, "build_flops": e.build_flops, "build_ms": e.build_ms}
        for e in snapshot.item_cache.entries()
    ]
    for c in caches:  # counted once, not per query: like the exact table's build_flops
        print(
            f"item-input cache {c['key']}: {c['bytes'] / 1e6:,.1f} MB, built once in {c['build_ms']:,.0f} ms "
            f"for {c['build_flops']:,} FLOPs (= {c['build_flops'] / oracle.flops:.2f} oracle queries)"
        )
    print(f"commit {_commit()}")
    default_stages = [s.model_dump() for s in snapshot.config.pair_stages or ()]
    return {
        "commit": _commit(),
        "item_caches": caches,
        "space": space.meta,
        "args": {k: str(v) for k, v in vars(args).items()},
        "default": default_stages,
        "rows": rows,
    }


def markdown(result: dict, rerank: str = "retrieve+rerank (dense, every member)") -> str:
    """The rows of a `run --out` file as a markdown table (docs/performance.md section 0)."""
    rows = result["rows"]
    ref = next(r for r in rows if r["name"] == rerank)
    lines = [
        "| method | recall@1 | recall@10 | nDCG@10 | agreement@10 | FLOPs per query | x fewer FLOPs than (a) "
        "| median ms | x less time than (a) | x less time than (c) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        oracle = r["name"] == "oracle"
        fewer = "-" if oracle else f"{r['flops_ratio']:,.1f}"
        faster = "-" if oracle else f"{r['time_ratio']:,.1f}"
        lines.append(
            f"| {r['name']} | {r['recall_at_1']:.3f} | {r['recall_at_k']:.3f} | {r['ndcg_at_10']:.3f} | "
            f"{r['agreement_at_10']:.3f} | {r['flops']:,.0f} | {fewer} | {r['ms']:.2f} | {faster} | "
            f"{ref['ms'] / r['ms']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build a big prototype space beside the default one")
    p.add_argument("--home", type=Path, default=Path("var"))
    p.add_argument("--name", default="pairbig")
    p.add_argument("--prototypes", type=int, default=10_000)
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--seed", type=int, default=7)
    r = sub.add_parser("run", help="oracle, FAISS only, retrieve+rerank and cascades, side by side")
    r.add_argument("--home", type=Path, default=Path("var"))
    r.add_argument("--space", default="pairbig")
    r.add_argument("--queries", type=int, default=200)
    r.add_argument(
        "--split", choices=("all", "dev", "test"), default="all", help="which held-out queries (dev: odd positions)"
    )
    r.add_argument("--candidates", type=int, default=200, help="M, the clusters stage 0 proposes")
    r.add_argument("--k", type=int, default=10)
    r.add_argument("--firsts", default="pair-s10,pair-s30")
    r.add_argument("--samples", default="1,2")
    r.add_argument("--keeps", default="20,40")
    r.add_argument("--last-samples", default="10", help="the dense stage's samples, comma-separated")
    r.add_argument(
        "--extra",
        action="append",
        help="another cascade, e.g. pair-s10/1/80,pair-s30/2/40,pair-dense/5//mean_logit (repeatable)",
    )
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--out", type=Path)
    t = sub.add_parser("table", help="print a run's --out file as a markdown table")
    t.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    if args.command == "table":
        import json

        print(markdown(json.loads(args.file.read_text())))
        return 0
    if args.command == "prepare":
        set_threads(1)
        prepare(args.home, args.name, args.prototypes, args.views, args.queries, args.seed)
        return 0
    result = run(args)
    if args.out is not None:
        dump_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
