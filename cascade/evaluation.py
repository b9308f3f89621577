"""Quality and cost of a cascade against the true cluster labels and the dense exhaustive oracle, measured
side by side in one run (research notes 2)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from cascade.config import Stage
from cascade.engine import dense_oracle, run_cascade, target_from_label
from cascade.snapshot import Snapshot

__all__ = ["recall_at_k", "ndcg_at_k", "agreement_at_k", "LabelQueryReport", "evaluate_label_queries"]


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
            target = target_from_label(snapshot, label)
            t0 = time.perf_counter()
            result = run_cascade(snapshot, target, k, stages, seed)
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
