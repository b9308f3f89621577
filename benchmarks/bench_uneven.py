"""Uneven clusters: what the dense oracle ranks by, and how often the classifier cascade agrees.

    .venv/bin/python -m benchmarks.bench_uneven --home /tmp/pc-uneven --kmeans 400 --seeds 0 1 2
    .venv/bin/python -m benchmarks.bench_uneven --home /tmp/pc-even --kmeans 0     # same-label clusters of 10
    .venv/bin/python -m benchmarks.bench_uneven --home /tmp/pc-uneven --pure-sizes 200   # pure, sizes 1..199

Builds (once) a classifier-only home whose space is the held-out MNIST-1D pool (22,880 items) partitioned by FAISS
k-means (`BootstrapConfig(pair=None, kmeans_clusters=K)`: sizes from 1 to a few hundred), with the bootstrap's
dense model and pruned variants. `--pure-sizes M` re-partitions the same items into clusters of one true label each
with sizes drawn uniformly from 1..M-1 (seeded), a space both uneven and pure.

Then, for every label and member-sampling seed, it runs the default classifier cascade twice, with every stage
aggregating by `bayes` (the default) and by `mean_logit`, and compares each with
three oracles that use the dense model on the clusters' members:

- `bayes-all`: `bayes` over every member (what `dense_oracle` ranked by before it became `mean_logit`);
- `bayes-10`: `bayes` over 10 members per cluster (a seeded uniform subset; all members of smaller clusters);
- `mean_logit-all`: `mean_logit` over every member, i.e. the members' mean log-posterior, the evidence of an
  average member, which does not grow with the cluster's size; `dense_oracle` ranks by it now (the script checks).

Printed per (cascade, oracle): agreement@10, and the median size of the clusters in each top 10.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from cascade.bootstrap import bootstrap
from cascade.bootstrap_config import BootstrapConfig
from cascade.engine import ORACLE_AGGREGATOR, dense_oracle
from cascade.plan import target_from_label
from cascade.ranking_metrics import agreement_at_k
from cascade.side_by_side import HeldOutQuery, side_by_side
from cascade.side_by_side import stages as stages_method
from cascade.snapshot import Snapshot
from cascade.space import build_space, sample_members
from cascade.target import ranking_key
from models.aggregation import MemberOutputs, aggregate
from models.inference import score_chunked

__all__ = ["main", "oracle_top"]

ORACLES = {"bayes-all": ("bayes", None), "bayes-10": ("bayes", 10), "mean_logit-all": ("mean_logit", None)}


def oracle_top(snapshot: Snapshot, label: int, k: int, aggregator: str, members: int | None) -> np.ndarray:
    """The dense model on `members` members of every cluster (None: all), aggregated, ranked by label log-odds."""
    space = snapshot.space
    alive = np.arange(space.num_clusters)
    n = int(space.sizes.max()) if members is None else members
    rows, counts = sample_members(space.offsets, alive, n, np.random.default_rng(0))
    dense = snapshot.dense_for("classifier")
    target = target_from_label(snapshot, label)
    with torch.inference_mode():
        x = torch.index_select(snapshot.features, 0, torch.from_numpy(rows))
        logits, hidden = score_chunked(dense.model, None, x)
        log_post = aggregate(aggregator, MemberOutputs(logits, hidden), torch.from_numpy(counts), dense.log_prior)
        keys = ranking_key(log_post.double(), target)
        return torch.topk(keys, k).indices.numpy()


def pure_uneven(snapshot: Snapshot, max_size: int, seed: int) -> Snapshot:
    """The snapshot's items re-partitioned into clusters of one true label each, sizes uniform in 1..max_size-1."""
    space = snapshot.space
    rng = np.random.default_rng(seed)
    cluster = np.empty(space.num_items, dtype=np.int64)
    next_id = 0
    for label in np.unique(space.labels):
        idx = rng.permutation(np.flatnonzero(space.labels == label))
        start = 0
        while start < len(idx):
            size = int(rng.integers(1, max_size))
            cluster[idx[start : start + size]] = next_id
            next_id, start = next_id + 1, start + size
    meta = {**space.meta, "id": f"{space.meta.get('id', '')}-pure-uneven{max_size}-s{seed}", "clusters": "pure-uneven"}
    resized = build_space(space.features, space.labels, space.prior, cluster, meta)
    return dataclasses.replace(snapshot, space=resized, features=torch.from_numpy(resized.features))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path("/tmp/pc-uneven"))
    parser.add_argument("--kmeans", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--pure-sizes", type=int, default=0, help="re-partition: pure clusters of sizes 1..N-1")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = bootstrap(args.home, BootstrapConfig(pair=None, kmeans_clusters=args.kmeans), progress=False)
    from benchmarks.common import load_snapshot_from

    snapshot = load_snapshot_from(args.home, "default")
    if args.pure_sizes:
        snapshot = pure_uneven(snapshot, args.pure_sizes, seed=0)
    space = snapshot.space
    sizes = space.sizes
    print(
        json.dumps(
            {
                "clusters": int(space.num_clusters),
                "items": int(space.num_items),
                "size_min": int(sizes.min()),
                "size_median": float(np.median(sizes)),
                "size_max": int(sizes.max()),
                "purity": space.meta.get("purity"),
                "stages": [s.model_dump() for s in config.stages_for("classifier")],
            }
        ),
        flush=True,
    )
    stages = snapshot.config.stages_for("classifier")
    cascades = {
        "bayes": None,
        "mean_logit": tuple(s.model_copy(update={"aggregator": "mean_logit"}) for s in stages),
    }
    oracles = {
        name: {label: oracle_top(snapshot, label, args.k, agg, m) for label in range(space.num_classes)}
        for name, (agg, m) in ORACLES.items()
    }
    same = all(
        set(dense_oracle(snapshot, target_from_label(snapshot, label), args.k).cluster_ids.tolist())
        == set(oracles[f"{ORACLE_AGGREGATOR}-all"][label].tolist())
        for label in range(space.num_classes)
    )
    print(f"{ORACLE_AGGREGATOR}-all top {args.k} = cascade.engine.dense_oracle's for every label: {same}", flush=True)
    for name, tops in oracles.items():
        med = statistics.median(float(np.median(sizes[t])) for t in tops.values())
        print(f"oracle {name}: median over labels of the median size in its top {args.k}: {med:.0f}", flush=True)
    queries = [
        HeldOutQuery(f"label {label}", lambda s, label=label: target_from_label(s, label), info={"label": label})
        for label in range(space.num_classes)
    ]
    methods = [stages_method(cname, cstages) for cname, cstages in cascades.items()]
    rounds = side_by_side(snapshot, queries, methods, args.k, args.seeds, reference=None)
    for cname in cascades:
        agree: dict[str, list[float]] = {o: [] for o in oracles}
        med_sizes, recall = [], []
        for r in rounds:
            label, got = r.query.info["label"], r[cname].cluster_ids
            med_sizes.append(float(np.median(sizes[got])))
            recall.append(float((space.cluster_labels[got] == label).mean()))
            for o, tops in oracles.items():
                agree[o].append(agreement_at_k(got, tops[label], args.k))
        row = {
            "cascade": cname,
            "queries": len(recall),
            "precision@k": round(statistics.mean(recall), 4),
            "median_size_in_top_k": statistics.median(med_sizes),
            **{f"agreement@{args.k} vs {o}": round(statistics.mean(v), 4) for o, v in agree.items()},
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
