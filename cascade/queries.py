"""The held-out query set shipped with a space, and the graded ground truth of a query by example.

Grades (research notes 2, project definition): 2 = the query's own cluster (same prototype, a near
duplicate), 1 = a cluster of the same label, 0 = other. They depend on the cluster only, never on which
member is looked at: the clusters are cliques of the retrieval function."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["QuerySet", "QUERIES_FILE", "cluster_grades", "DEFAULT_GAINS"]

QUERIES_FILE = "queries.npz"
DEFAULT_GAINS: tuple[float, ...] = (0.0, 1.0, 3.0)


@dataclass(frozen=True)
class QuerySet:
    """Fresh views of the space's prototypes (never one of its items), with the cluster each one belongs to."""

    x: np.ndarray  # (Q, D) float32
    cluster: np.ndarray  # (Q,) int64, the row of the query's own cluster in the space (grade 2)
    label: np.ndarray  # (Q,) int64

    def __len__(self) -> int:
        return len(self.x)

    def save(self, directory: Path) -> None:
        tmp = directory / f".{QUERIES_FILE}.tmp.npz"
        np.savez(tmp, x=self.x, cluster=self.cluster, label=self.label)
        tmp.replace(directory / QUERIES_FILE)

    @classmethod
    def load(cls, directory: Path) -> QuerySet | None:
        path = directory / QUERIES_FILE
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as f:
            return cls(
                x=f["x"].astype(np.float32), cluster=f["cluster"].astype(np.int64), label=f["label"].astype(np.int64)
            )


def cluster_grades(cluster_labels: np.ndarray, own_cluster: int, label: int) -> np.ndarray:
    """The grade of every cluster for a query whose own cluster and label are given."""
    grades = (cluster_labels == label).astype(np.int64)
    if own_cluster >= 0:
        grades[own_cluster] = 2
    return grades
