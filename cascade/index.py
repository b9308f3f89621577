"""The FAISS index over the space: an IVF whose inverted list c holds exactly cluster c's items and whose
coarse quantizer holds the cluster centroids, so "nearest clusters" is one quantizer search."""

from __future__ import annotations

import functools
from pathlib import Path

import faiss
import numpy as np

from cascade.space import Space

__all__ = ["ClusterIndex", "INDEX_FILE"]

INDEX_FILE = "index.faiss"


class ClusterIndex:
    def __init__(self, ivf: faiss.IndexIVFFlat) -> None:
        self.ivf = ivf

    @classmethod
    def build(cls, space: Space) -> ClusterIndex:
        """Over the raw features (the classifier path's query-by-example fallback)."""
        return cls.from_vectors(space.features, space.offsets)

    @classmethod
    def from_vectors(cls, vectors: np.ndarray, offsets: np.ndarray) -> ClusterIndex:
        """Over any per-item vectors stored grouped by cluster (`offsets` as in `Space`), e.g. a learned
        embedding; each coarse centroid is the mean of its cluster's vectors."""
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        sizes = np.diff(offsets)
        d, k = x.shape[1], len(sizes)
        centroids = np.add.reduceat(x.astype(np.float64), offsets[:-1], axis=0) / sizes[:, None]
        quantizer = faiss.IndexFlatL2(d)
        quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
        ivf = faiss.IndexIVFFlat(quantizer, d, k)
        ivf.is_trained = True  # the centroids are the clusters' own, not trained
        ids = np.arange(len(x), dtype=np.int64)
        assign = np.repeat(np.arange(k, dtype=np.int64), sizes)
        ivf.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(assign))
        index = cls(ivf)
        index._quantizer = quantizer  # keep the Python object alive with the index
        return index

    @property
    def num_clusters(self) -> int:
        return int(self.ivf.nlist)

    def list_size(self, cluster: int) -> int:
        return int(self.ivf.invlists.list_size(cluster))

    def nearest_clusters(self, queries: np.ndarray, count: int) -> np.ndarray:
        """Distinct clusters nearest to any query vector, best first (round-robin over queries)."""
        return self.nearest_clusters_with_distances(queries, count)[0]

    def nearest_clusters_with_distances(self, queries: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """As `nearest_clusters`, with each cluster's squared L2 distance from its centroid to the query that
        proposed it."""
        count = min(count, self.num_clusters)
        dist, ids = self.ivf.quantizer.search(np.ascontiguousarray(queries, dtype=np.float32), count)
        flat, flat_dist = ids.T.reshape(-1), dist.T.reshape(-1)
        keep = flat >= 0
        flat, flat_dist = flat[keep], flat_dist[keep]
        _, first = np.unique(flat, return_index=True)
        order = np.sort(first)[:count]
        return flat[order].astype(np.int64), flat_dist[order].astype(np.float64)

    def centroids(self, clusters: np.ndarray) -> np.ndarray:
        """The coarse centroids of `clusters` (float32), as the quantizer stores them: rows of its own vectors,
        read in place (one gather per query, not one reconstruction per cluster)."""
        return self._centroid_rows[np.asarray(clusters, dtype=np.int64)]

    @functools.cached_property
    def _centroid_rows(self) -> np.ndarray:
        """(clusters, d) over the flat quantizer's storage, without a copy: the index owns the memory (and keeps
        the quantizer alive), so the view lives as long as this object."""
        quantizer = faiss.downcast_index(self.ivf.quantizer)
        n, d = int(quantizer.ntotal), int(quantizer.d)
        if not isinstance(quantizer, faiss.IndexFlat):  # another quantizer stores codes: reconstruct them once
            return quantizer.reconstruct_n(0, n)
        view = faiss.rev_swig_ptr(quantizer.get_xb(), n * d).reshape(n, d)
        view.flags.writeable = False
        return view

    def save(self, directory: Path, name: str = INDEX_FILE) -> None:
        tmp = directory / f".{name}.tmp"
        faiss.write_index(self.ivf, str(tmp))
        tmp.replace(directory / name)

    @classmethod
    def load(cls, directory: Path, name: str = INDEX_FILE) -> ClusterIndex:
        """The inverted lists (every item's vector, most of the file) are mapped, not read: answering uses only
        the centroids and the lists' sizes, so they are never paged in, and worker processes share the file's
        pages instead of holding a copy each. Files are replaced by rename, so a mapped one never changes."""
        return cls(faiss.read_index(str(directory / name), faiss.IO_FLAG_MMAP))  # already the concrete IVF type
