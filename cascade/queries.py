"""The held-out query set shipped with a space, and the graded ground truth of a query by example.

Grades: 2 = the query's own cluster (same prototype, a near
duplicate), 1 = a cluster of the same label, 0 = other. They depend on the cluster only, never on which
member is looked at: the clusters are cliques of the retrieval function.

On a user's own clusters the queries are held-out members (`hold_out_members`): each is removed from the
space, its cluster stays. Where the clusters carry no instance structure, the space has two grades (1 = same
label, 0 = other) and `default_gains(2)` = [0, 1]."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "QuerySet",
    "QUERIES_FILE",
    "SPLIT_RULE",
    "SPLITS",
    "dev_rows",
    "cluster_grades",
    "DEFAULT_GAINS",
    "default_gains",
    "hold_out_members",
]

QUERIES_FILE = "queries.npz"
DEFAULT_GAINS: tuple[float, ...] = (0.0, 1.0, 3.0)
SPLITS = ("test", "dev", "all")
SPLIT_RULE = (
    "the held-out queries in the order of the space's queries file: the one at an odd position (1, 3, 5, ...) is "
    "a dev query, the one at an even position (0, 2, 4, ...) a test query. Anything tuned (the default cascade) "
    "is tuned on dev queries; quality is reported on test queries"
)


def dev_rows(count: int) -> np.ndarray:
    """Which of `count` held-out queries are dev queries (`SPLIT_RULE`): every second one. Interleaved rather
    than a first and a second half, so that a queries file in the order of its clusters (a user's held-out
    members are sorted by row) splits evenly over them."""
    return np.arange(count) % 2 == 1


@dataclass(frozen=True)
class QuerySet:
    """Queries that are never items of the space (fresh views of its prototypes, or members held out of a
    user's clusters), with the cluster each one belongs to."""

    x: np.ndarray  # (Q, D) float32
    cluster: np.ndarray  # (Q,) int64, the row of the query's own cluster in the space (grade 2)
    label: np.ndarray  # (Q,) int64

    def __len__(self) -> int:
        return len(self.x)

    def split(self, name: str) -> QuerySet:
        """The dev or the test queries of `SPLIT_RULE` (or "all"), in file order."""
        if name not in SPLITS:
            raise ValueError(f"unknown query split {name!r}; one of {', '.join(SPLITS)}")
        if name == "all":
            return self
        rows = dev_rows(len(self))
        rows = rows if name == "dev" else ~rows
        return QuerySet(x=self.x[rows], cluster=self.cluster[rows], label=self.label[rows])

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


def cluster_grades(cluster_labels: np.ndarray, own_cluster: int, label: int, num_grades: int = 3) -> np.ndarray:
    """The grade of every cluster for a query whose own cluster and label are given. With `num_grades` 2 (a
    space without instance structure) the own cluster is graded as any cluster of its label."""
    grades = (cluster_labels == label).astype(np.int64)
    if own_cluster >= 0 and num_grades > 2:
        grades[own_cluster] = 2
    return grades


def default_gains(num_grades: int) -> tuple[float, ...]:
    """The utility of a query by example when it names none: [0, 1, 3] over three grades, [0, 1] over the two
    of a space without instance structure (other, same label)."""
    if num_grades <= len(DEFAULT_GAINS):
        return DEFAULT_GAINS[:num_grades]
    return tuple(float(g) for g in range(num_grades))


def hold_out_members(cluster: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of up to `count` queries held out of a user's clusters: distinct clusters with at least two members
    (so the cluster stays in the space, one member fewer), drawn uniformly, and one member of each drawn
    uniformly. Returns the rows in increasing order."""
    cluster = np.asarray(cluster)
    _, inverse, sizes = np.unique(cluster, return_inverse=True, return_counts=True)
    eligible = np.flatnonzero(sizes >= 2)
    chosen = rng.choice(eligible, size=min(count, len(eligible)), replace=False)
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    rows = order[starts[chosen] + (rng.random(len(chosen)) * sizes[chosen]).astype(np.int64)]
    return np.sort(rows)
