"""Which fine-tuning keeps a pruned pair variant closest to its dense parent at equal FLOPs: distillation by
margin-MSE of ranking-key differences (`margin`), MSE of the aggregated logits (`logits`), or the parent's own
listwise objective on the labels (`labels`), each from the same pruned scorer, on the retriever's candidate
lists of the home's training clusters. Measured on the space's dev queries (odd positions of the queries file):
each variant reranks FAISS's top M, reading every member of every candidate (`mean_logit`), against the dense
model's rerank of the same candidates.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pair_distill.py --home var-digits \
        --method greedy-asymmetric --keep 0.1 --steps 200 --queries 250
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cascade.bootstrap import prototype_training_sets, user_pair_sets
from cascade.bootstrap_config import PairConfig
from cascade.config import CONFIG_FILE, CascadeConfig
from cascade.snapshot import load_snapshot
from models.data import load_dataset
from models.pair import PairNetwork, pair_flops
from models.pair_training import default_grade_gains, ranking_key, train_pair_listwise
from models.pruning.pair import pair_calibration, prune_pair
from models.registry import ModelRegistry


def training_sets(home: Path, dense_manifest) -> tuple:  # type: ignore[no-untyped-def]
    """The sets the home's pair models were trained on: MNIST-1D prototypes, or a user's clusters."""
    record = json.loads((home / "bootstrap.json").read_text())
    if record["dataset"] == "mnist1d":
        return prototype_training_sets(PairConfig())
    splits = load_dataset(record["dataset"], seed=record["seed"], num_samples=record["num_samples"])
    train, val = user_pair_sets(splits)
    grades = int(dense_manifest.spec.get("num_grades", 3))
    return replace(train, num_grades=grades), replace(val, num_grades=grades)


@torch.no_grad()
def rerank_keys(model: PairNetwork, snapshot, query: np.ndarray, top: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    offsets = snapshot.space.offsets
    rows = np.concatenate([np.arange(offsets[c], offsets[c + 1]) for c in top])
    dense = snapshot.variants[snapshot.config.pair_dense]
    table = snapshot.item_inputs(dense, torch.from_numpy(rows))
    logits = model.score_prepared(model.prepare(torch.from_numpy(query[None]), len(rows)), table)[0].double()
    counts = torch.from_numpy(np.diff(offsets)[top])
    seg = torch.repeat_interleave(torch.arange(len(top)), counts)
    mean = torch.zeros(len(top), logits.shape[1], dtype=torch.float64).index_add_(0, seg, logits) / counts[:, None]
    return ranking_key(torch.log_softmax(mean, 1), default_grade_gains(logits.shape[1]).double()).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--method", default="greedy-asymmetric")
    p.add_argument("--keep", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--queries", type=int, default=250)
    p.add_argument("--candidates", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    registry = ModelRegistry(args.home / "registry")
    config = CascadeConfig.load(args.home / CONFIG_FILE)
    snapshot = load_snapshot(registry, args.home / "spaces" / "default", config)
    dense_loaded = registry.load(config.pair_dense)
    dense = dense_loaded.model
    assert isinstance(dense, PairNetwork) and dense.retriever is not None
    train, val = training_sets(args.home, dense_loaded.manifest)
    pruned = prune_pair(dense, args.method, args.keep, pair_calibration(train, 512, args.seed), reweight=True)
    listwise = replace(PairConfig().listwise, steps=args.steps, eval_every=min(50, args.steps), seed=args.seed)
    variants = {"none": pruned}
    for how in ("margin", "logits", "labels"):
        t0 = time.perf_counter()
        teacher = None if how == "labels" else dense
        variants[how], _ = train_pair_listwise(
            copy.deepcopy(pruned), train, val, listwise, train_front=False, teacher=teacher,
            distill="margin" if how == "labels" else how,
        )  # fmt: skip
        print(f"{how}: {time.perf_counter() - t0:.0f} s", flush=True)
    qs = snapshot.queries
    assert qs is not None
    dev = np.flatnonzero(np.arange(len(qs)) % 2 == 1)[: args.queries]
    gains = np.asarray(default_grade_gains(dense.spec.num_grades))
    labels = snapshot.space.cluster_labels
    rows: dict[str, list[tuple[float, ...]]] = {n: [] for n in ["dense", *variants]}
    for i in dev:
        top = snapshot.embedding.candidates(qs.x[i : i + 1], args.candidates)[0]
        grade = np.where(labels == qs.label[i], 1, 0)
        grade[qs.cluster[i]] = dense.spec.num_grades - 1
        ref = top[np.argsort(-rerank_keys(dense, snapshot, qs.x[i], top), kind="stable")]
        for name in rows:
            model = dense if name == "dense" else variants[name]
            order = top[np.argsort(-rerank_keys(model, snapshot, qs.x[i], top), kind="stable")]
            got = grade[order[:10]]
            disc = 1 / np.log2(np.arange(2, 12))
            ideal = (np.sort(gains[grade])[::-1][:10] * disc).sum()
            agree = len(set(order[:10]) & set(ref[:10])) / 10
            rows[name].append((float(got[0] == grade.max()), float((gains[got] * disc).sum() / ideal), agree))
    flops = {n: pair_flops(dense if n == "dense" else m).nonzero for n, m in [("dense", dense), *variants.items()]}
    print(f"{len(dev)} dev queries, FAISS top {args.candidates}, {args.method} keep {args.keep}, {args.steps} steps")
    print(f"{'variant':10s} {'R@1':>6s} {'nDCG@10':>8s} {'agree@10 with dense':>20s} {'FLOPs/pair':>11s}")
    for name, v in rows.items():
        r1, ndcg, agree = np.mean(v, 0)
        print(f"{name:10s} {r1:6.3f} {ndcg:8.3f} {agree:20.3f} {flops[name]:11,d}")


if __name__ == "__main__":
    main()
