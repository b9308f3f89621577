"""Quality and cost of a cascade against the true cluster labels and the dense exhaustive oracle, measured
side by side in one run; the metrics are those of `cascade.ranking_metrics`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cascade.config import Stage
from cascade.plan import target_from_label
from cascade.ranking_metrics import agreement_at_k, hit_at_k, ndcg_at_k, recall_at_k, relevant_items
from cascade.side_by_side import ORACLE, HeldOutQuery, side_by_side
from cascade.side_by_side import stages as stages_method
from cascade.snapshot import Snapshot

__all__ = [
    "graded_metrics",
    "label_queries",
    "example_queries",
    "LabelQueryReport",
    "evaluate_label_queries",
    "ExampleQueryReport",
    "evaluate_example_queries",
]


@dataclass(frozen=True)
class LabelQueryReport:
    queries: int
    k: int
    recall: float
    ndcg: float
    agreement: float
    oracle_recall: float
    flops: float
    oracle_flops: float
    ms: float  # median over queries
    oracle_ms: float  # median over queries

    @property
    def flops_ratio(self) -> float:
        """How many times fewer FLOPs than the oracle."""
        return self.oracle_flops / self.flops

    @property
    def time_ratio(self) -> float:
        return self.oracle_ms / self.ms


def label_queries(snapshot: Snapshot) -> list[HeldOutQuery]:
    """One query per class: its target is the user's label of the class, relevant are the clusters of it."""
    labels = snapshot.space.cluster_labels
    return [
        HeldOutQuery(
            f"label {c}",
            lambda snap, c=c: target_from_label(snap, snap.space.labels_known[c]),
            frozenset(relevant_items(labels, c)),
            (labels == c).astype(np.float64),  # binary relevance
            {"label": c},
        )
        for c in range(snapshot.space.num_classes)
    ]


def evaluate_label_queries(
    snapshot: Snapshot,
    k: int = 10,
    stages: tuple[Stage, ...] | None = None,
    seeds: tuple[int, ...] = (0, 1, 2),
) -> LabelQueryReport:
    """One query per label and seed, the cascade beside the oracle (`side_by_side`), so machine noise hits both
    alike."""
    rounds = side_by_side(snapshot, label_queries(snapshot), [stages_method("cascade", stages)], k, seeds)
    rows = []
    for r in rounds:
        got, oracle = r["cascade"], r["oracle"]
        rows.append(
            (
                recall_at_k(got.cluster_ids, r.query.relevant, k),
                ndcg_at_k(got.cluster_ids, r.query.gains, k),
                agreement_at_k(got.cluster_ids, oracle.cluster_ids, k),
                recall_at_k(oracle.cluster_ids, r.query.relevant, k),
                got.flops,
                oracle.flops,
                got.ms,
                oracle.ms,
            )
        )
    table = np.asarray(rows, dtype=np.float64)
    quality_and_flops = np.nanmean(table[:, :6], axis=0)
    times = np.median(table[:, 6:], axis=0)  # medians: one slow query on a shared machine must not decide
    return LabelQueryReport(len(rows), k, *(float(v) for v in (*quality_and_flops, *times)))


def graded_metrics(
    cluster_ids: np.ndarray, grades: np.ndarray, gains: np.ndarray, k: int = 10
) -> tuple[float, float, float]:
    """Hit@1 and hit@k of the top-grade cluster (recall, when there is exactly one), and graded nDCG@k with
    `gains[grade]`, for one query whose clusters have `grades` (K,)."""
    top = relevant_items(grades, int(grades.max()))
    return hit_at_k(cluster_ids, top, 1), hit_at_k(cluster_ids, top, k), ndcg_at_k(cluster_ids, gains[grades], k)


@dataclass(frozen=True)
class ExampleQueryReport:
    """One way of answering queries by example, over a held-out query set (means, and median times)."""

    name: str
    queries: int
    k: int
    recall_at_1: float
    recall_at_k: float
    ndcg_at_10: float
    agreement_at_10: float  # with the oracle's top 10
    flops: float
    ms: float  # median per query, stage 0 (embedding the query, searching the centroids) included


def example_queries(
    snapshot: Snapshot, candidates: int, count: int | None = None, split: str = "test"
) -> list[HeldOutQuery]:
    """The snapshot's held-out queries by example of `split` (the first `count`; `cascade.queries.SPLIT_RULE`:
    test, never tuned on; dev; all): each a fresh view, embedded with `candidates` clusters from stage 0; its
    clusters graded from its own cluster and label (`cascade.queries.cluster_grades`), gains by grade."""
    from cascade.plan import target_from_examples
    from cascade.queries import cluster_grades, default_gains

    qs = snapshot.queries
    if qs is None or len(qs) == 0:
        raise ValueError("the space has no held-out queries")
    qs = qs.split(split)
    count = len(qs) if count is None else min(count, len(qs))
    labels = snapshot.space.cluster_labels
    out = []
    for i in range(count):
        own, label = int(qs.cluster[i]), int(qs.label[i])
        grades = cluster_grades(labels, own, label, snapshot.num_grades or 3)
        out.append(
            HeldOutQuery(
                f"query {i}",
                lambda snap, i=i: target_from_examples(snap, qs.x[i : i + 1], candidates),
                frozenset(relevant_items(grades, int(grades.max()))),
                np.asarray(default_gains(snapshot.num_grades or 3), dtype=np.float64)[grades],
                {"cluster": own, "label": label},
            )
        )
    return out


def evaluate_example_queries(
    snapshot: Snapshot,
    methods: dict[str, tuple[Stage, ...] | list[Stage] | None],
    k: int = 10,
    candidates: int = 200,
    queries: int | None = None,
    oracle: bool = True,
    seed: int = 0,
    split: str = "test",
) -> dict[str, ExampleQueryReport]:
    """Every method (a stage list; None is the default cascade, [] is FAISS only) and the dense exhaustive oracle
    on the snapshot's held-out queries of `split` (test: never tuned on), side by side (`side_by_side`; query i
    samples with seed + i)."""
    from cascade.queries import cluster_grades

    held_out = example_queries(snapshot, max(candidates, k), queries, split)
    planned = [stages_method(name, st) for name, st in methods.items()]
    depth = max(k, 10)  # agreement is @10 whatever k is
    rounds = side_by_side(
        snapshot, held_out, planned, depth, (seed,), reference=ORACLE if oracle else None, seed_per_query=True
    )
    names = [*methods, *(["oracle"] if oracle else [])]
    rows: dict[str, list[tuple[float, ...]]] = {n: [] for n in names}
    labels = snapshot.space.cluster_labels
    for r in rounds:
        grades = cluster_grades(labels, r.query.info["cluster"], r.query.info["label"], len(r.target.utility))
        reference = r["oracle"].cluster_ids if oracle else None
        for name in names:
            rec = r[name]
            r1, rk, ndcg = graded_metrics(rec.cluster_ids, grades, r.target.utility, k)
            agree = agreement_at_k(rec.cluster_ids, reference, 10) if reference is not None else math.nan
            rows[name].append((r1, rk, ndcg, agree, rec.flops, rec.ms))
    out = {}
    for name, values in rows.items():
        table = np.asarray(values, dtype=np.float64)
        means = np.nanmean(table[:, :5], axis=0)
        out[name] = ExampleQueryReport(name, len(rounds), k, *(float(v) for v in means), float(np.median(table[:, 5])))
    return out
