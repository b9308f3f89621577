"""A structured space: items stored sorted by cluster, so cluster c is the row range offsets[c]:offsets[c+1].
Labels are the offline truth used for evaluation only; the cascade never reads them. The user's own cluster ids,
item ids and labels are stored beside the positions, so that answers can speak the user's language."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cascade.npz_map import load_npz_mapped

__all__ = [
    "Space",
    "build_space",
    "clusters_by_label",
    "clusters_by_kmeans",
    "sample_members",
    "sample_dense_keys",
    "sample_sorted_keys",
    "SPACE_FILE",
    "META_FILE",
    "PROBE_FILE",
    "PAIR_PROBE_FILE",
]

SPACE_FILE = "space.npz"
META_FILE = "meta.json"
PROBE_FILE = "probe.npz"  # labelled test items of a space: the accuracy gate of an uploaded classifier
PAIR_PROBE_FILE = "pair_probe.npz"  # graded (query, item) pairs: the gate of an uploaded pair model


@dataclass(frozen=True)
class Space:
    """Rows are addressed internally by position (cluster c, item i); the user's own ids and labels are kept
    beside them (`cluster_ids`, `item_ids`, `class_labels`) and are what every answer shows."""

    features: np.ndarray  # (N, D) float32, rows grouped by cluster
    labels: np.ndarray  # (N,) int64, true item classes 0..C-1 (offline only)
    offsets: np.ndarray  # (K + 1,) int64
    cluster_labels: np.ndarray  # (K,) int64, majority class of each cluster
    prior: np.ndarray  # (C,) float64, class frequencies of the training data
    meta: dict
    cluster_ids: np.ndarray | None = None  # (K,) int64, the user's id of each cluster; default 0..K-1
    item_ids: np.ndarray | None = None  # (N,) int64, the user's id of each item (row); default 0..N-1
    class_labels: np.ndarray | None = None  # (C,) int64, the user's label of each class; default 0..C-1
    cluster_parts: np.ndarray | None = None
    """(K,) int8: where each cluster went when the models were trained (`models.data.PARTS`: train, validation,
    test, pool = no model saw it); None when the space is only clusters no model saw (or built-in data)."""

    def __post_init__(self) -> None:
        defaults = {
            "cluster_ids": len(self.offsets) - 1,
            "item_ids": len(self.features),
            "class_labels": len(self.prior),
        }
        for name, n in defaults.items():
            value = getattr(self, name)
            value = np.arange(n, dtype=np.int64) if value is None else np.asarray(value, dtype=np.int64)
            if value.shape != (n,):
                raise ValueError(f"{name} needs {n} entries, got {value.shape}")
            object.__setattr__(self, name, value)
        for name in ("cluster_ids", "item_ids", "class_labels"):
            values = getattr(self, name)
            if len(np.unique(values)) != len(values):
                raise ValueError(f"{name} must be unique")
        if self.cluster_parts is not None:
            parts = np.asarray(self.cluster_parts, dtype=np.int8)
            if parts.shape != (self.num_clusters,):
                raise ValueError(f"cluster_parts needs {self.num_clusters} entries, got {parts.shape}")
            object.__setattr__(self, "cluster_parts", parts)

    @property
    def num_items(self) -> int:
        return len(self.features)

    @property
    def num_clusters(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_classes(self) -> int:
        return len(self.prior)

    @property
    def input_dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def labels_known(self) -> list[int]:
        """The labels a query may ask for, as the user wrote them (class c is `labels_known[c]`)."""
        return [int(v) for v in self.class_labels]  # type: ignore[union-attr]

    def class_of(self, label: int) -> int | None:
        """The class index of one of the user's labels, or None when the space cannot have that label."""
        return _position(self.class_labels, label)  # type: ignore[arg-type]

    def cluster_of(self, cluster_id: int) -> int | None:
        """The cluster index (0..K-1) of a user's cluster id, or None when there is no such cluster."""
        return _position(self.cluster_ids, cluster_id)  # type: ignore[arg-type]

    def item_of(self, item_id: int) -> int | None:
        """The row of a user's item id, or None when there is no such item."""
        return _position(self.item_ids, item_id)  # type: ignore[arg-type]

    def part_of(self, cluster: int) -> str | None:
        """Which split cluster `cluster` (an index) went to when the models were trained, or None when unknown."""
        from models.data import PARTS

        return None if self.cluster_parts is None else PARTS[int(self.cluster_parts[cluster])]

    def centroids(self) -> np.ndarray:
        sums = np.add.reduceat(self.features.astype(np.float64), self.offsets[:-1], axis=0)
        return (sums / self.sizes[:, None]).astype(np.float32)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{SPACE_FILE}.tmp.npz"
        optional = {} if self.cluster_parts is None else {"cluster_parts": self.cluster_parts}
        np.savez(
            tmp,
            features=self.features,
            labels=self.labels,
            offsets=self.offsets,
            cluster_labels=self.cluster_labels,
            prior=self.prior,
            cluster_ids=self.cluster_ids,
            item_ids=self.item_ids,
            class_labels=self.class_labels,
            **optional,
        )
        tmp.replace(directory / SPACE_FILE)
        (directory / META_FILE).write_text(json.dumps(self.meta, indent=2))

    @classmethod
    def load(cls, directory: Path) -> Space:
        """The arrays mapped read-only from the file (`cascade.npz_map`); spaces saved before ids were kept load
        with the default ids (positions)."""
        arrays = load_npz_mapped(directory / SPACE_FILE)  # read-only views of the file: shared by worker processes
        return cls(meta=json.loads((directory / META_FILE).read_text()), **arrays)


def _position(ids: np.ndarray, value: int) -> int | None:
    """Where `value` sits in `ids` (unique), or None; a value beyond int64 is simply absent."""
    if not -(2**63) <= int(value) < 2**63:
        return None
    hits = np.flatnonzero(ids == int(value))
    return int(hits[0]) if len(hits) else None


def clusters_by_label(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Fixed-size clusters of same-label items (the last cluster of a label may be smaller)."""
    cluster = np.empty(len(labels), dtype=np.int64)
    next_id = 0
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        ids = np.arange(len(idx)) // size
        cluster[idx] = next_id + ids
        next_id += int(ids.max()) + 1
    return cluster


def clusters_by_kmeans(features: np.ndarray, k: int, seed: int) -> np.ndarray:
    """FAISS k-means when the data has no partition of its own; empty clusters are dropped by renumbering."""
    import faiss

    km = faiss.Kmeans(features.shape[1], k, niter=20, seed=seed, verbose=False)
    km.train(np.ascontiguousarray(features, dtype=np.float32))
    _, assign = km.index.search(np.ascontiguousarray(features, dtype=np.float32), 1)
    return np.unique(assign[:, 0], return_inverse=True)[1].astype(np.int64)


def build_space(
    features: np.ndarray,
    labels: np.ndarray,
    prior: np.ndarray,
    cluster: np.ndarray,
    meta: dict | None = None,
    item_ids: np.ndarray | None = None,
    class_labels: np.ndarray | None = None,
    item_parts: np.ndarray | None = None,
) -> Space:
    """Sort items by cluster and record each cluster's majority label, the partition's purity and its sizes.
    The values of `cluster` become the clusters' ids (`cluster_ids`, in increasing order); `item_ids` (one per
    row of `features`, default: the row in the sorted space) and `class_labels` (the user's label of each class)
    are kept for answers. `item_parts` (one `models.data.PARTS` code per item, equal within a cluster) records
    which clusters the models saw, in `cluster_parts` and as counts in the meta's `seen_by_models`."""
    if not (len(features) == len(labels) == len(cluster)):
        raise ValueError("features, labels and cluster must have one row per item")
    if item_ids is not None and len(item_ids) != len(features):
        raise ValueError("item_ids must have one entry per item")
    cluster_ids, cluster = np.unique(cluster, return_inverse=True)  # dense ids 0..K-1, the user's ids kept
    order = np.argsort(cluster, kind="stable")
    cluster = cluster[order]
    k = int(cluster.max()) + 1
    sizes = np.bincount(cluster, minlength=k)
    offsets = np.zeros(k + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(sizes)
    num_classes = len(prior)
    votes = np.zeros((k, num_classes), dtype=np.int64)
    np.add.at(votes, (cluster, labels[order]), 1)
    purity = float(votes.max(1).sum() / len(labels))
    class_labels = np.arange(num_classes) if class_labels is None else np.asarray(class_labels, dtype=np.int64)
    present = np.unique(labels)
    cluster_parts = None
    seen: dict[str, object] = {}
    if item_parts is not None:
        item_parts = np.asarray(item_parts)[order]
        cluster_parts = item_parts[offsets[:-1]].astype(np.int8)
        if (item_parts != np.repeat(cluster_parts, sizes)).any():
            raise ValueError("item_parts must be the same for every member of a cluster")
        seen = {"seen_by_models": _seen_by_models(cluster_parts, sizes)}
    described = {
        "num_items": len(labels),
        "num_clusters": k,
        "purity": purity,
        "cluster_sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())},
        "num_classes": num_classes,
        "classes": [int(c) for c in class_labels],
        "classes_in_space": [int(class_labels[c]) for c in present],
        **seen,
    }
    return Space(
        features=np.ascontiguousarray(features[order], dtype=np.float32),
        labels=labels[order].astype(np.int64),
        offsets=offsets,
        cluster_labels=votes.argmax(1).astype(np.int64),
        prior=np.asarray(prior, dtype=np.float64),
        meta={**(meta or {}), **described},
        cluster_ids=cluster_ids.astype(np.int64),
        item_ids=None if item_ids is None else np.asarray(item_ids, dtype=np.int64)[order],
        class_labels=class_labels,
        cluster_parts=cluster_parts,
    )


def _seen_by_models(cluster_parts: np.ndarray, sizes: np.ndarray) -> dict[str, object]:
    """Clusters and items per part, and what each part was used for (shown by GET /v1/space)."""
    from models.data import PARTS

    use = {
        "train": "the models were trained on them",
        "validation": "checkpoints and the grades decision were chosen on them",
        "test": "the probe sets that gate uploads come from them",
        "pool": "no model saw them: held-out queries are drawn from them",
    }
    return {
        name: {
            "clusters": int((cluster_parts == code).sum()),
            "items": int(sizes[cluster_parts == code].sum()),
            "use": use[name],
        }
        for code, name in enumerate(PARTS)
    }


def sample_members(
    offsets: np.ndarray, clusters: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Up to n members of each cluster, uniformly without replacement, for all clusters at once.

    Returns the sampled rows grouped by cluster (in the order of `clusters`) and the count per cluster,
    min(n, size). Every member gets a random key and each cluster keeps its n smallest: a uniform subset.
    No Python loop per cluster."""
    starts = offsets[clusters]
    sizes = offsets[clusters + 1] - starts
    counts = np.minimum(sizes, n)
    if len(clusters) == 0:
        return np.empty(0, dtype=np.int64), counts
    widest = int(sizes.max())
    if widest <= n:  # every member is taken: no sampling needed
        seg = np.repeat(np.arange(len(clusters)), sizes)
        local = np.arange(len(seg)) - (np.cumsum(sizes) - sizes)[seg]
        return (starts[seg] + local).astype(np.int64), counts
    if n == 1:  # one uniform member per cluster: no keys to sort (benchmarks/bench_sampling.py)
        return starts + (rng.random(len(sizes)) * sizes).astype(np.int64), counts
    if len(clusters) * widest <= 4 * int(sizes.sum()):
        return sample_dense_keys(starts, sizes, n, widest, rng), counts
    return sample_sorted_keys(starts, sizes, counts, rng), counts


def sample_dense_keys(
    starts: np.ndarray, sizes: np.ndarray, n: int, widest: int, rng: np.random.Generator
) -> np.ndarray:
    """Clusters of similar size: a (clusters x widest) key matrix, padding keyed +inf, and a partial sort
    per row: 10-12x faster than sorting every member's key on 10,000 clusters of 10
    (`python -m benchmarks.bench_sampling`)."""
    keys = rng.random((len(sizes), widest))
    keys[np.arange(widest)[None, :] >= sizes[:, None]] = np.inf
    pick = np.argpartition(keys, n - 1, axis=1)[:, :n]
    valid = pick < sizes[:, None]  # clusters smaller than n also picked padding: drop it
    return (starts[:, None] + pick)[valid].astype(np.int64)


def sample_sorted_keys(
    starts: np.ndarray, sizes: np.ndarray, counts: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Clusters of very uneven size (e.g. k-means): sort (cluster, key) over the members actually present,
    so memory stays proportional to the members rather than clusters x the largest cluster."""
    seg = np.repeat(np.arange(len(sizes)), sizes)
    run_start = np.cumsum(sizes) - sizes
    local = np.arange(len(seg)) - run_start[seg]
    order = np.lexsort((rng.random(len(seg)), seg))
    rank = np.arange(len(seg)) - run_start[seg[order]]
    chosen = order[rank < counts[seg[order]]]
    return (starts[seg[chosen]] + local[chosen]).astype(np.int64)
