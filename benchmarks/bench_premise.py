"""The premise of queries by example: does the dense pair model, scoring every member of every cluster (Bayes
aggregation), beat the bi-encoder alone (query vs cluster centroids)? Prints recall@1, recall@10 of the
grade-2 cluster and graded nDCG@10 (gains [0, 1, 3]) for both, the single-pair grade confusion, FLOPs per
pair and the measured time per 10,000 pairs on 1 thread.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_premise.py [--queries 300] [--jitter 3] ...
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch

from cascade.evaluation import graded_metrics
from cascade.ranking_metrics import mean_over_queries
from models.biencoder import cluster_centroids, embed_numpy
from models.biencoder_training import BiEncoderTrainConfig, train_biencoder
from models.pair import PairNetwork, default_pair_spec, pair_cost
from models.pair_training import (
    PairTrainConfig,
    make_pairs,
    pair_accuracy,
    pair_calibration,
    pair_logits,
    train_pair_model,
)
from models.prototypes import DEFAULT_PROTOTYPES, PrototypeSet, grades, make_prototype_set, make_queries
from models.pruning.pair import probe_pairs, prune_pair

GAINS = np.array([0.0, 1.0, 3.0])


def premise_metrics(scores: np.ndarray, g: np.ndarray, k: int = 10) -> dict[str, float]:
    """scores, g: (Q, K). recall@1/@k of the grade-2 cluster (one per query: hit@1, hit@k) and nDCG@k under
    GAINS (ties broken by index): `cascade.evaluation.graded_metrics`, as every method of the engine's evaluation
    and the ceiling (`lab/ceiling.py`) are scored; means over queries."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    rows = [graded_metrics(ranking, grades_q, GAINS, k) for ranking, grades_q in zip(order, g, strict=True)]
    r1, rk, ndcg = (mean_over_queries(column) for column in zip(*rows, strict=True))
    return {"recall@1": r1, "recall@10": rk, "ndcg@10": ndcg}


@torch.no_grad()
def pair_cluster_scores(
    model: PairNetwork, items: np.ndarray, cluster: np.ndarray, xq: np.ndarray, prior: np.ndarray, chunk: int = 4000
) -> tuple[np.ndarray, np.ndarray, float]:
    """Score every item against every query; Bayes (product of experts) and mean_prob cluster scores.
    Returns (bayes scores (Q, K), mean_prob scores (Q, K), seconds spent in the pair model)."""
    model.eval()
    k = int(cluster.max()) + 1
    counts = np.bincount(cluster, minlength=k)[:, None]
    fx = model.item_features(torch.from_numpy(items))
    log_prior = np.log(prior)
    bayes, mean = np.zeros((len(xq), k)), np.zeros((len(xq), k))
    seconds = 0.0
    for i, q in enumerate(xq):
        fq = model.query_features(torch.from_numpy(q[None]))
        start = time.perf_counter()
        logp = torch.cat(
            [torch.log_softmax(model.forward_features(fq, fx[j : j + chunk])[0], 1) for j in range(0, len(fx), chunk)]
        ).numpy()
        seconds += time.perf_counter() - start
        sums = np.zeros((k, logp.shape[1]))
        np.add.at(sums, cluster, logp)
        post = sums - (counts - 1) * log_prior
        post = np.exp(post - post.max(1, keepdims=True))
        post /= post.sum(1, keepdims=True)
        bayes[i] = post @ GAINS
        psum = np.zeros((k, logp.shape[1]))
        np.add.at(psum, cluster, np.exp(logp))
        mean[i] = (psum / counts) @ GAINS
    return bayes, mean, seconds


@torch.no_grad()
def time_per_10k(model: PairNetwork, items: np.ndarray, repeats: int = 5) -> float:
    """Median milliseconds to score 10,000 cached items against one query (chunks of 2,000)."""
    fx = model.item_features(torch.from_numpy(items[:10_000]))
    fq = model.query_features(torch.from_numpy(items[:1]))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for j in range(0, len(fx), 2000):
            model.forward_features(fq, fx[j : j + 2000])
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)) * 10_000 / len(fx)


def classifier_embedding(space: PrototypeSet, xq: np.ndarray, g: np.ndarray, seed: int) -> dict[str, float]:
    """The bootstrap's dense classifier (default cnn1d on MNIST-1D, 52,000 generated items) with its
    penultimate representation h, L2-normalised, as the embedding; clusters by their mean h."""
    from models.data import load_dataset
    from models.dense import default_spec
    from models.networks import build_network
    from models.training import TrainConfig, train_classifier

    splits = load_dataset("mnist1d", seed=seed)
    torch.manual_seed(seed)
    model = build_network(default_spec(splits, "cnn1d"))
    start = time.perf_counter()
    train_classifier(model, splits.x_train, splits.y_train, splits.x_val, splits.y_val, TrainConfig(progress=False))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        h_items = torch.nn.functional.normalize(model.body(torch.from_numpy(space.x)), dim=1).numpy()
        h_q = torch.nn.functional.normalize(model.body(torch.from_numpy(xq)), dim=1).numpy()
    cents = cluster_centroids(h_items, space.cluster, len(space.cluster_labels))
    return {**premise_metrics(h_q @ cents.T, g), "train_seconds": round(seconds, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prototypes", type=int, default=2000)
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--train-prototypes", type=int, default=4000)
    p.add_argument("--jitter", type=int, default=DEFAULT_PROTOTYPES.jitter)
    p.add_argument("--iid-noise", type=float, default=DEFAULT_PROTOTYPES.iid_noise_scale)
    p.add_argument("--corr-noise", type=float, default=DEFAULT_PROTOTYPES.corr_noise_scale)
    p.add_argument("--pair-steps", type=int, default=PairTrainConfig().steps)
    p.add_argument("--bi-steps", type=int, default=BiEncoderTrainConfig().steps)
    d = default_pair_spec()
    p.add_argument("--channels", type=int, default=d.trunk_channels)
    p.add_argument("--max-shift", type=int, default=d.max_shift)
    p.add_argument("--pool", type=int, default=d.pool)
    p.add_argument("--regions", type=int, default=d.regions)
    p.add_argument("--energies", action=argparse.BooleanOptionalAction, default=d.energies)
    p.add_argument("--trunk-layers", type=int, default=d.trunk_layers)
    p.add_argument("--interaction", default=d.interaction, choices=["channels", "positions"])
    p.add_argument("--hidden", default=",".join(str(h) for h in d.scorer.hidden))
    p.add_argument("--hard-fraction", type=float, default=PairTrainConfig().hard_fraction)
    p.add_argument("--listwise", type=float, default=PairTrainConfig().listwise)
    p.add_argument("--group-size", type=int, default=PairTrainConfig().group_size)
    p.add_argument("--lr", type=float, default=PairTrainConfig().lr)
    p.add_argument("--batch", type=int, default=PairTrainConfig().batch_size)
    p.add_argument("--skip-bi", action="store_true", help="only the pair model (architecture search)")
    p.add_argument(
        "--classifier-embedding",
        action="store_true",
        help="also measure the dense classifier's penultimate layer as the embedding (trains the default cnn1d)",
    )
    p.add_argument("--only-embeddings", action="store_true", help="skip the pair model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the numbers to this file")
    args = p.parse_args()
    torch.set_num_threads(1)

    cfg = replace(
        DEFAULT_PROTOTYPES,
        num_prototypes=args.prototypes,
        views=args.views,
        jitter=args.jitter,
        iid_noise_scale=args.iid_noise,
        corr_noise_scale=args.corr_noise,
        seed=args.seed,
    )
    space = make_prototype_set(cfg, "space")
    train = make_prototype_set(replace(cfg, num_prototypes=args.train_prototypes), "train")
    val = make_prototype_set(replace(cfg, num_prototypes=500), "val")
    xq, cq, yq = make_queries(cfg, args.queries, seed=1)
    g = grades(cq, yq, np.arange(args.prototypes), space.cluster_labels)
    out: dict[str, object] = {"args": vars(args)}

    start = time.perf_counter()
    if args.skip_bi:
        args.bi_steps = 1
    bi = train_biencoder(train, val, replace(BiEncoderTrainConfig(), steps=args.bi_steps, seed=args.seed))
    bi_seconds = time.perf_counter() - start
    cents = cluster_centroids(embed_numpy(bi, space.x), space.cluster, args.prototypes)
    bi_scores = embed_numpy(bi, xq) @ cents.T
    out["biencoder"] = {**premise_metrics(bi_scores, g), "train_seconds": round(bi_seconds, 1)}
    print("bi-encoder  ", out["biencoder"], flush=True)
    if args.classifier_embedding:
        out["classifier_embedding"] = classifier_embedding(space, xq, g, args.seed)
        print("classifier h", out["classifier_embedding"], flush=True)
    if args.only_embeddings:
        return

    spec = default_pair_spec(
        trunk_channels=args.channels,
        max_shift=args.max_shift,
        pool=args.pool,
        regions=args.regions,
        energies=args.energies,
        trunk_layers=args.trunk_layers,
        interaction=args.interaction,
        hidden=tuple(int(h) for h in args.hidden.split(",")),
    )
    config = replace(
        PairTrainConfig(),
        steps=args.pair_steps,
        seed=args.seed,
        hard_fraction=args.hard_fraction,
        listwise=args.listwise,
        group_size=args.group_size,
        lr=args.lr,
        batch_size=args.batch,
    )
    model, report = train_pair_model(spec, train, val, config)
    print(
        f"pair model: val pair accuracy {report.val_accuracy:.3f} (best step {report.best_step}), "
        f"{report.seconds:.1f} s",
        flush=True,
    )
    pairs = make_pairs(val, 6000, (1 / 3, 1 / 3, 1 / 3), np.random.default_rng(99))
    pred = pair_logits(model, pairs).argmax(1).numpy()
    confusion = np.zeros((3, 3), dtype=int)
    np.add.at(confusion, (pairs.grade.numpy(), pred), 1)
    single_21 = confusion[2, 2] / max(confusion[2, 1:].sum(), 1), confusion[1, 1] / max(confusion[1, 1:].sum(), 1)
    prior = np.asarray(report.grade_prior)
    bayes, mean, seconds = pair_cluster_scores(model, space.x, space.cluster, xq, prior)
    cost = pair_cost(model)
    out["pair"] = {
        "bayes": premise_metrics(bayes, g),
        "mean_prob": premise_metrics(mean, g),
        "val_pair_accuracy": report.val_accuracy,
        "confusion_rows_true_cols_pred": confusion.tolist(),
        "single_item_2_vs_1": [round(float(v), 3) for v in single_21],
        "train_seconds": round(report.seconds, 1),
        "flops_per_pair": cost.per_pair.dense_kernel,
        "flops_interaction": cost.interaction.dense_kernel,
        "flops_scorer": cost.scorer.dense_kernel,
        "flops_trunk_per_item": cost.per_item.dense_kernel,
        "cache_floats_per_item": cost.cache_floats_per_item,
        "ms_per_10k_pairs": round(time_per_10k(model, space.x), 1),
        "oracle_seconds_per_query": round(seconds / len(xq), 3),
    }
    print("pair model  ", json.dumps(out["pair"]), flush=True)
    calibration = pair_calibration(train, 512, seed=args.seed)
    probes = probe_pairs(val, seed=args.seed)
    for method, keep in (("greedy-asymmetric", 0.1), ("greedy-asymmetric", 0.25)):
        pruned = prune_pair(model, method, keep, calibration, reweight=True)
        c = pair_cost(pruned)
        row = {
            "method": method,
            "keep": keep,
            "reweight": True,
            "flops_per_pair": c.per_pair.dense_kernel,
            "flops_ratio": round(cost.per_pair.dense_kernel / c.per_pair.dense_kernel, 2),
            "ms_per_10k_pairs": round(time_per_10k(pruned, space.x), 1),
            "pair_accuracy_balanced": round(pair_accuracy(pruned, probes), 3),
            "dense_pair_accuracy_balanced": round(pair_accuracy(model, probes), 3),
        }
        out.setdefault("pruned", []).append(row)  # type: ignore[union-attr]
        print("pruned      ", json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
