"""Exact answers from the table of dense cluster posteriors against the default cascade and the dense oracle,
side by side in one process (not a test).

    .venv/bin/python -m benchmarks.bench_exact prepare --home /tmp/exact-home        # a >= 100,000-item space
    .venv/bin/python -m benchmarks.bench_exact run --home var --out var/bench/exact_default.json
    .venv/bin/python -m benchmarks.bench_exact run --home /tmp/exact-home --space big --out var/bench/exact_big.json
    .venv/bin/python -m benchmarks.bench_exact lookup --clusters 100000,1000000

`prepare` bootstraps HOME if needed (the embedded default: dense trained 40 epochs) and adds a `big` space
built as `bench_cascade prepare` builds its own (the same MNIST-1D generation and seed, same-label clusters of
10), without the extra pruned variants that only the cascade sweeps need. `run`: the table is built once to
warm up, then `--builds` times (median build time), saved and loaded back (the cost of a restart or a second
replica); then in every round each label is queried by the exact path, the service's default cascade and the
oracle, in a shuffled order, and so are `--utilities` random utilities.
Break-even: how many queries the one-time build costs, in wall time (build / (per-query time saved)) and in
FLOPs (build FLOPs / (per-query FLOPs saved)), against the oracle and against the default cascade.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import BIG_SPACE, dump_json, load_snapshot_from, median, parse_ints, set_threads

__all__ = ["main", "prepare_big", "run", "lookup", "report"]

PATHS = ("exact", "cascade", "oracle")


def prepare_big(home: Path, samples: int = 120_000, seed: int = 101, name: str = BIG_SPACE) -> None:
    """The default models (bootstrap, skipped where they exist) and `bench_cascade`'s common-target space."""
    from benchmarks.common import write_space
    from cascade.bootstrap import bootstrap
    from cascade.bootstrap_config import BootstrapConfig
    from cascade.space import META_FILE, SPACE_FILE, clusters_by_label
    from models.data import load_dataset

    config = BootstrapConfig()
    bootstrap(home, config, progress=True)
    directory = home / "spaces" / name
    if all((directory / f).exists() for f in (SPACE_FILE, META_FILE)):
        print(f"{directory} exists")
        return
    train = load_dataset("mnist1d", seed=config.seed, num_samples=config.num_samples, cache_dir=home / "data")
    big = load_dataset("mnist1d", seed=seed, num_samples=samples, fractions=(0.01, 0.01, 0.01), cache_dir=home / "data")
    rng = np.random.default_rng(seed)
    cluster = clusters_by_label(big.y_pool, 10, rng)
    meta = {"id": f"bench-big-s{seed}-n{len(big.y_pool)}", "dataset": "mnist1d", "clusters": "same-label"}
    space = write_space(directory, big.x_pool, big.y_pool, train.prior, cluster, meta)
    print(f"{name} space: {space.num_items:,} items, {space.num_clusters:,} clusters", flush=True)


def _value(log_post: np.ndarray, ids: np.ndarray, utility: np.ndarray) -> float:
    """Mean expected utility of the returned clusters under the dense posterior (the oracle's own score): with
    many near-ties among confident clusters, agreement@k of a utility target says little; this says how much
    of the oracle's top-k utility an answer reaches."""
    return float((np.exp(log_post[ids].astype(np.float64)) @ utility).mean())


def run(home: Path, space_name: str, k: int, seeds: tuple[int, ...], utilities: int, builds: int) -> dict:
    from cascade.exact import build_table, load_table, lookup_flops, save_table, table_bytes, table_path
    from cascade.plan import target_from_label, target_from_utility
    from cascade.ranking_metrics import agreement_at_k, recall_at_k, relevant_items
    from cascade.side_by_side import ORACLE, HeldOutQuery, side_by_side
    from cascade.side_by_side import exact as exact_method
    from cascade.side_by_side import stages as stages_method

    set_threads(1)
    snap = load_snapshot_from(home, space_name)
    space = snap.space
    K, C = space.num_clusters, space.num_classes
    print(f"{space.meta.get('id')}: {space.num_items:,} items, {K:,} clusters, k={k}, torch threads 1", flush=True)

    table = build_table(snap, progress=False)  # also the warm-up of the dense model's kernels
    build_s = []
    for _ in range(builds):
        table = build_table(snap, progress=False)
        build_s.append(table.build_seconds)
    with tempfile.TemporaryDirectory() as tmp:
        path = table_path(Path(tmp), table.dense_sha256)
        t0 = time.perf_counter()
        save_table(table, path)
        save_ms = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        loaded = load_table(path, table.dense_sha256, table.space_id, (K, C))
        load_ms = (time.perf_counter() - t0) * 1000
        assert np.array_equal(loaded.log_post, table.log_post)

    methods = {"exact": exact_method("exact", table), "cascade": stages_method("cascade", None), "oracle": ORACLE}
    rng = np.random.default_rng(0)
    utility_vectors = [rng.dirichlet(np.ones(C)) for _ in range(utilities)]
    warm = target_from_label(snap, 0)
    for path in PATHS:  # first calls allocate and pick kernels
        methods[path].answer(snap, warm, k, 0)

    queries = [
        HeldOutQuery(f"label {label}", lambda s, label=label: target_from_label(s, label),
                     frozenset(relevant_items(space.cluster_labels, label)), info={"kind": "label", "which": label})
        for label in range(C)
    ] + [
        HeldOutQuery(f"utility {i}", lambda s, i=i: target_from_utility(s, utility_vectors[i]),
                     info={"kind": "utility", "which": i})
        for i in range(utilities)
    ]  # fmt: skip
    rounds = side_by_side(
        snap, queries, [methods[p] for p in PATHS], k, seeds, reference=None,
        shuffle=np.random.default_rng(12345), progress=lambda msg: print(f"  {msg}", flush=True),
    )  # fmt: skip
    rows: list[dict] = []
    for r in rounds:
        kind, which = r.query.info["kind"], r.query.info["which"]
        oracle_ids = r["oracle"].cluster_ids
        exact_value = _value(table.log_post, oracle_ids, r.target.utility)
        for p in PATHS:
            got = r[p]
            row = {
                "path": p,
                "kind": kind,
                "which": which,
                "seed": r.seed,
                "ms": got.ms,
                "flops": got.flops,
                "agreement": agreement_at_k(got.cluster_ids, oracle_ids, k),
            }
            if kind == "utility":
                row["value_ratio"] = _value(table.log_post, got.cluster_ids, r.target.utility) / exact_value
            if kind == "label":
                row["recall"] = recall_at_k(got.cluster_ids, r.query.relevant, k)
            rows.append(row)

    summary = {}
    for p in PATHS:
        mine = [r for r in rows if r["path"] == p]
        labels = [r for r in mine if r["kind"] == "label"]
        per_label = {
            label: float(np.mean([r["agreement"] for r in labels if r["which"] == label])) for label in range(C)
        }
        summary[p] = {
            "ms": median([r["ms"] for r in mine]),
            "ms_label": median([r["ms"] for r in labels]),
            "flops": float(np.mean([r["flops"] for r in mine])),
            "agreement_label": float(np.mean([r["agreement"] for r in labels])),
            "agreement_label_min": min(per_label.values()),
            "agreement_per_label": per_label,
            "agreement_utility": float(np.mean([r["agreement"] for r in mine if r["kind"] == "utility"]))
            if utilities
            else None,
            "recall": float(np.mean([r["recall"] for r in labels])),
            "value_ratio_utility": float(np.mean([r["value_ratio"] for r in mine if r["kind"] == "utility"]))
            if utilities
            else None,
        }
    build = median(build_s)
    e, c, o = (summary[p] for p in PATHS)
    return {
        "space": space.meta.get("id", ""),
        "items": space.num_items,
        "clusters": K,
        "classes": C,
        "k": k,
        "seeds": list(seeds),
        "utilities": utilities,
        "dense": table.dense_ref,
        "build_seconds": build_s,
        "build_seconds_median": build,
        "build_flops": table.build_flops,
        "save_ms": save_ms,
        "load_ms": load_ms,
        "table_bytes": table_bytes(K, C),
        "lookup_flops": lookup_flops(K, C),
        "break_even": {
            "oracle_queries_by_time": build * 1000 / (o["ms"] - e["ms"]),
            "cascade_queries_by_time": build * 1000 / (c["ms"] - e["ms"]) if c["ms"] > e["ms"] else None,
            "oracle_queries_by_flops": table.build_flops / (o["flops"] - e["flops"]),
            "cascade_queries_by_flops": table.build_flops / (c["flops"] - e["flops"]),
        },
        "memory": {f"1e{n}": table_bytes(10**n, C) for n in (6, 8)},
        "summary": summary,
        "rows": rows,
    }


def lookup(clusters: tuple[int, ...], classes: int, repeats: int) -> list[dict]:
    """Per-query time of the lookup alone on synthetic tables (random log posteriors) of many clusters: what
    an exact answer costs where no oracle could be run in a benchmark."""
    import torch

    from cascade.exact import ExactTable
    from cascade.target import Target

    set_threads(1)
    rng = np.random.default_rng(0)
    out = []
    for K in clusters:
        logits = torch.from_numpy(rng.normal(size=(K, classes)).astype(np.float32) * 5)
        table = ExactTable((logits - logits.logsumexp(1, keepdim=True)).numpy(), "synthetic:1", "0" * 64, "", 0.0, 0)
        label = Target(utility=np.eye(classes)[3], label=3)
        utility = Target(utility=rng.dirichlet(np.ones(classes)))
        times = {"label": [], "utility": []}
        for i in range(repeats + 1):
            for kind, target in (("label", label), ("utility", utility)):
                t0 = time.perf_counter()
                table.answer(target, 10)
                if i:  # the first round warms up
                    times[kind].append((time.perf_counter() - t0) * 1000)
        row = {"clusters": K, "bytes": table.nbytes, **{f"{k}_ms": median(v) for k, v in times.items()}}
        print(
            f"{K:,} clusters x {classes} classes: table {table.nbytes:,} bytes; median lookup over {repeats}: "
            f"label {row['label_ms']:.2f} ms, utility {row['utility_ms']:.2f} ms",
            flush=True,
        )
        out.append(row)
    return out


def report(result: dict) -> str:
    s, b = result["summary"], result["break_even"]
    lines = [
        f"{result['space']}: {result['items']:,} items, {result['clusters']:,} clusters, {result['classes']} classes, "
        f"k={result['k']}, dense {result['dense']}, seeds {result['seeds']}, every label + {result['utilities']} "
        f"random utilities per seed, torch threads 1",
        "",
        "| path | median ms (all) | median ms (labels) | FLOPs per query | agreement@10, labels (min label) "
        "| agreement@10, utilities | utility shortfall, utilities | recall@10, labels |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in PATHS:
        r = s[p]
        util = f"{r['agreement_utility']:.3f}" if r["agreement_utility"] is not None else "-"
        value = f"{1 - r['value_ratio_utility']:.1e}" if r.get("value_ratio_utility") is not None else "-"
        lines.append(
            f"| {p} | {r['ms']:.2f} | {r['ms_label']:.2f} | {r['flops']:,.0f} | {r['agreement_label']:.3f} "
            f"({r['agreement_label_min']:.2f}) | {util} | {value} | {r['recall']:.4f} |"
        )
    lines += [
        "",
        "Utility shortfall: 1 - (mean expected utility of the returned clusters under the dense posterior) / "
        "(the same for the oracle's top k).",
        "",
        "Per-label agreement@10 with the oracle: "
        + "; ".join(
            f"{label}: exact {s['exact']['agreement_per_label'][label]:.2f} / cascade "
            f"{s['cascade']['agreement_per_label'][label]:.2f}"
            for label in s["exact"]["agreement_per_label"]
        ),
        "",
        f"Build: median {result['build_seconds_median']:.2f} s over {len(result['build_seconds'])} builds "
        f"({', '.join(f'{v:.2f}' for v in result['build_seconds'])}), {result['build_flops'] / 1e9:.2f} GFLOP; "
        f"save {result['save_ms']:.0f} ms, load + verify {result['load_ms']:.0f} ms; table "
        f"{result['table_bytes']:,} bytes; lookup {result['lookup_flops']:,} FLOPs.",
        f"Break-even (queries): against the oracle {b['oracle_queries_by_time']:.2f} by time, "
        f"{b['oracle_queries_by_flops']:.2f} by FLOPs; against the default cascade "
        + (f"{b['cascade_queries_by_time']:.1f}" if b["cascade_queries_by_time"] is not None else "never")
        + f" by time, {b['cascade_queries_by_flops']:.1f} by FLOPs.",
        f"Memory of one table at 10^6 clusters: {result['memory']['1e6']:,} bytes; at 10^8: "
        f"{result['memory']['1e8']:,} bytes ({result['classes']} classes, float32).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare", help="bootstrap HOME if needed and add bench_cascade's big space")
    pr.add_argument("--home", type=Path, required=True)
    pr.add_argument("--big-samples", type=int, default=120_000)
    pr.add_argument("--big-seed", type=int, default=101)
    pr.add_argument("--big-name", default=BIG_SPACE)
    r = sub.add_parser("run", help="exact vs default cascade vs oracle, interleaved")
    r.add_argument("--home", type=Path, default=Path("var"))
    r.add_argument("--space", default="default", help="space under HOME/spaces")
    r.add_argument("--k", type=int, default=10)
    r.add_argument("--seeds", default="0,1,2", help="cascade member-sampling seeds; each runs every query")
    r.add_argument("--utilities", type=int, default=5, help="random utility targets per seed (besides labels)")
    r.add_argument("--builds", type=int, default=3, help="table builds timed (median reported)")
    r.add_argument("--out", type=Path)
    lk = sub.add_parser("lookup", help="lookup time alone on synthetic tables of many clusters")
    lk.add_argument("--clusters", default="100000,1000000")
    lk.add_argument("--classes", type=int, default=10)
    lk.add_argument("--repeats", type=int, default=20)
    rep = sub.add_parser("report", help="the markdown summary of a run's JSON")
    rep.add_argument("--results", type=Path, required=True)
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        prepare_big(args.home, args.big_samples, args.big_seed, args.big_name)
        return 0
    if args.cmd == "run":
        seeds = parse_ints(args.seeds)
        if not seeds:
            p.error("--seeds: at least one seed")
        if args.builds < 1 or args.k < 1 or args.utilities < 0:
            p.error("--builds and --k must be >= 1, --utilities >= 0")
        result = run(args.home, args.space, args.k, seeds, args.utilities, args.builds)
        if args.out:
            dump_json(args.out, result)
        print(report(result))
        return 0
    if args.cmd == "lookup":
        lookup(parse_ints(args.clusters), args.classes, args.repeats)
        return 0
    import json

    print(report(json.loads(args.results.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
