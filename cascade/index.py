"""The FAISS index over the space: an IVF whose inverted list c holds exactly cluster c's items and whose
coarse quantizer holds the cluster centroids, so "nearest clusters" is one quantizer search."""

from __future__ import annotations

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
        d, k = space.input_dim, space.num_clusters
        quantizer = faiss.IndexFlatL2(d)
        quantizer.add(space.centroids())
        ivf = faiss.IndexIVFFlat(quantizer, d, k)
        ivf.is_trained = True  # the centroids are the clusters' own, not trained
        x = np.ascontiguousarray(space.features, dtype=np.float32)
        ids = np.arange(space.num_items, dtype=np.int64)
        assign = np.repeat(np.arange(k, dtype=np.int64), space.sizes)
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
        count = min(count, self.num_clusters)
        _, ids = self.ivf.quantizer.search(np.ascontiguousarray(queries, dtype=np.float32), count)
        flat = ids.T.reshape(-1)
        flat = flat[flat >= 0]
        _, first = np.unique(flat, return_index=True)
        return flat[np.sort(first)][:count].astype(np.int64)

    def save(self, directory: Path) -> None:
        tmp = directory / f".{INDEX_FILE}.tmp"
        faiss.write_index(self.ivf, str(tmp))
        tmp.replace(directory / INDEX_FILE)

    @classmethod
    def load(cls, directory: Path) -> ClusterIndex:
        return cls(faiss.read_index(str(directory / INDEX_FILE)))  # already the concrete IVF type
