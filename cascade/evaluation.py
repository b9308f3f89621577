"""Quality and cost of a cascade against the true cluster labels and the dense exhaustive oracle, measured
side by side in one run (research notes 2)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from cascade.config import Stage
from cascade.engine import dense_oracle
from cascade.plan import execute, plan_target, target_from_label
from cascade.snapshot import Snapshot

__all__ = [
    "recall_at_k",
    "ndcg_at_k",
    "agreement_at_k",
    "graded_metrics",
    "LabelQueryReport",
    "evaluate_label_queries",
    "ExampleQueryReport",
    "evaluate_example_queries",
]


def recall_at_k(retrieved_labels: np.ndarray, label: int, k: int, num_relevant: int) -> float:
    """Relevant clusters among the top k, over the most that could be there, min(k, relevant)."""
    if num_relevant == 0:
        return math.nan
    return float((retrieved_labels[:k] == label).sum()) / min(k, num_relevant)


def ndcg_at_k(retrieved_labels: np.ndarray, label: int, k: int, num_relevant: int) -> float:
    """Binary-relevance nDCG: hits near the top count more."""
    if num_relevant == 0:
        return math.nan
    gains = (retrieved_labels[:k] == label).astype(np.float64)
    discounts = 1.0 / np.log2(np.arange(2, len(gains) + 2))
    ideal = discounts[: min(k, num_relevant)].sum()
    return float((gains * discounts).sum() / ideal)


def agreement_at_k(retrieved: np.ndarray, oracle: np.ndarray, k: int) -> float:
    """Fraction of the oracle's top k that the cascade also returned."""
    return len(set(retrieved[:k].tolist()) & set(oracle[:k].tolist())) / min(k, len(oracle))


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


def evaluate_label_queries(
    snapshot: Snapshot,
    k: int = 10,
    stages: tuple[Stage, ...] | None = None,
    seeds: tuple[int, ...] = (0, 1, 2),
) -> LabelQueryReport:
    """One query per label and seed; cascade and oracle run alternately so machine noise hits both alike."""
    space = snapshot.space
    rows = []
    for label in range(space.num_classes):
        relevant = int((space.cluster_labels == label).sum())
        for seed in seeds:
            target = target_from_label(snapshot, space.labels_known[label])  # the user's label of class `label`
            t0 = time.perf_counter()
            result = execute(plan_target(snapshot, target, k, stages), seed)
            t1 = time.perf_counter()
            oracle = dense_oracle(snapshot, target, k)
            t2 = time.perf_counter()
            got = space.cluster_labels[result.cluster_ids]
            rows.append(
                (
                    recall_at_k(got, label, k, relevant),
                    ndcg_at_k(got, label, k, relevant),
                    agreement_at_k(result.cluster_ids, oracle.cluster_ids, k),
                    recall_at_k(space.cluster_labels[oracle.cluster_ids], label, k, relevant),
                    result.flops,
                    oracle.flops,
                    (t1 - t0) * 1000,
                    (t2 - t1) * 1000,
                )
            )
    table = np.asarray(rows, dtype=np.float64)
    quality_and_flops = np.nanmean(table[:, :6], axis=0)
    times = np.median(table[:, 6:], axis=0)  # medians: one slow query on a shared machine must not decide
    return LabelQueryReport(len(rows), k, *(float(v) for v in (*quality_and_flops, *times)))


def graded_metrics(
    cluster_ids: np.ndarray, grades: np.ndarray, gains: np.ndarray, k: int = 10
) -> tuple[float, float, float]:
    """Hit@1 and hit@k of the grade-2 cluster (recall, since there is exactly one), and graded nDCG@k with
    `gains[grade]`, for one query whose clusters have `grades` (K,)."""
    got = grades[cluster_ids[:k]]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = float((gains[got] * discounts[: len(got)]).sum())
    ideal = float((np.sort(gains[grades])[::-1][:k] * discounts[: min(k, len(grades))]).sum())
    top = int(grades.max())
    return float(len(got) > 0 and got[0] == top), float((got == top).any()), dcg / ideal if ideal > 0 else math.nan


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


def evaluate_example_queries(
    snapshot: Snapshot,
    methods: dict[str, tuple[Stage, ...] | list[Stage] | None],
    k: int = 10,
    candidates: int = 200,
    queries: int | None = None,
    oracle: bool = True,
    seed: int = 0,
) -> dict[str, ExampleQueryReport]:
    """Every method (a stage list; None is the default cascade, [] is FAISS only) and the dense exhaustive oracle
    on the snapshot's held-out queries, side by side: per query, each method runs once in turn, so machine noise
    hits all of them alike. Grades come from each query's own cluster and label (research notes 2)."""
    from cascade.plan import target_from_examples
    from cascade.queries import cluster_grades

    qs = snapshot.queries
    if qs is None or len(qs) == 0:
        raise ValueError("the space has no held-out queries")
    count = len(qs) if queries is None else min(queries, len(qs))
    names = [*methods, *(["oracle"] if oracle else [])]
    rows: dict[str, list[tuple[float, ...]]] = {n: [] for n in names}
    for i in range(count):
        t0 = time.perf_counter()
        target = target_from_examples(snapshot, qs.x[i : i + 1], max(candidates, k))
        stage0_ms = (time.perf_counter() - t0) * 1000  # embedding + centroid search: every method but the oracle
        grades = cluster_grades(
            snapshot.space.cluster_labels, int(qs.cluster[i]), int(qs.label[i]), len(target.utility)
        )
        answers = {}
        for name in names:
            t0 = time.perf_counter()
            if name == "oracle" and oracle:
                result = dense_oracle(snapshot, target, max(k, 10))
            else:
                result = execute(plan_target(snapshot, target, max(k, 10), methods[name]), seed + i)
            ms = (time.perf_counter() - t0) * 1000 + (0.0 if name == "oracle" else stage0_ms)
            answers[name] = (result, ms)
        reference = answers["oracle"][0].cluster_ids if oracle else None
        for name, (result, ms) in answers.items():
            r1, rk, ndcg = graded_metrics(result.cluster_ids, grades, target.utility, k)
            agree = agreement_at_k(result.cluster_ids, reference, 10) if reference is not None else math.nan
            stage0 = 0 if name == "oracle" else target.flops  # the oracle embeds nothing
            rows[name].append((r1, rk, ndcg, agree, result.flops + stage0, ms))
    out = {}
    for name, values in rows.items():
        table = np.asarray(values, dtype=np.float64)
        means = np.nanmean(table[:, :5], axis=0)
        out[name] = ExampleQueryReport(name, count, k, *(float(v) for v in means), float(np.median(table[:, 5])))
    return out
