"""Memory per item of what a replica holds for a space, measured on a loaded snapshot (not a test): the pair
models' item cache (float32 and float16), the space's own arrays, the FAISS indexes (serialized size: what they
hold in memory, vectors and ids of every item, centroids) and the exact table, each divided by the number of
items (and of clusters), for the capacity model in docs/operations.md.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_capacity --home /work/home-default \
        --centroids 100000,1000000

With `--centroids`, stage 0 as it searches today (exhaustive over the cluster centroids, 64 floats each in the
default embedding) is timed over that many random centroids, one query at a time on one thread.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

__all__ = ["main", "measure"]


def _faiss_bytes(index) -> int:
    import faiss

    return int(faiss.serialize_index(index).size)


def measure(home: Path, space_name: str) -> dict:
    from benchmarks.common import load_snapshot_from
    from cascade.exact import ExactTable  # noqa: F401 - the table's layout: clusters x classes float32

    snap = load_snapshot_from(home, space_name)
    snap.warm()
    space = snap.space
    items, clusters = space.num_items, space.num_clusters
    cache = sum(e.nbytes for e in snap.item_cache.entries())
    arrays = {
        "features": space.features.nbytes,
        "labels, item ids": space.labels.nbytes + space.item_ids.nbytes,  # type: ignore[union-attr]
        "offsets, cluster ids, labels": space.offsets.nbytes
        + space.cluster_ids.nbytes  # type: ignore[union-attr]
        + space.cluster_labels.nbytes,
    }
    faiss_parts = {"raw-feature IVF (classifier cascade)": _faiss_bytes(snap.index.ivf)}
    if snap.embedding is not None:
        ivf = snap.embedding.index.ivf
        faiss_parts["embedding IVF (stage 0)"] = _faiss_bytes(ivf)
        faiss_parts["of which the centroids stage 0 searches"] = _faiss_bytes(ivf.quantizer)
    exact = clusters * space.num_classes * 4  # float32 log posteriors, one row per cluster
    out = {
        "items": items,
        "clusters": clusters,
        "item_cache_bytes_float32": cache,
        "item_cache_bytes_per_item_float32": cache / items,
        "item_cache_bytes_per_item_float16": cache / items / 2,
        "space_arrays_bytes_per_item": {k: v / items for k, v in arrays.items()},
        "faiss_bytes": faiss_parts,
        "faiss_bytes_per_item": {k: v / items for k, v in faiss_parts.items()},
        "exact_table_bytes": exact,
        "exact_table_bytes_per_cluster": exact / clusters,
        "exact_table_bytes_per_item": exact / items,
    }
    return out


def centroid_search_ms(clusters: int, dim: int, queries: int = 30, seed: int = 0) -> dict:
    """Stage 0 as it is today at a larger scale: one query at a time against an exhaustive (flat L2) index of
    `clusters` random centroids of `dim` floats, on one thread; median ms per query, CPU ms per query too."""
    import time

    import faiss

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(seed)
    index = faiss.IndexFlatL2(dim)
    for start in range(0, clusters, 1_000_000):
        index.add(rng.standard_normal((min(1_000_000, clusters - start), dim), dtype=np.float32))
    x = rng.standard_normal((queries, dim), dtype=np.float32)
    index.search(x[:1], 200)
    wall, cpu = [], []
    for i in range(queries):
        w0, c0 = time.perf_counter(), time.process_time()
        index.search(x[i : i + 1], 200)
        wall.append((time.perf_counter() - w0) * 1000.0)
        cpu.append((time.process_time() - c0) * 1000.0)
    return {
        "clusters": clusters,
        "dim": dim,
        "bytes_scanned_per_query": clusters * dim * 4,
        "ms_per_query_median": float(np.median(wall)),
        "cpu_ms_per_query_median": float(np.median(cpu)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, default=Path("/work/home-default"))
    p.add_argument("--space", default="default")
    p.add_argument(
        "--centroids",
        default="",
        help="e.g. '100000,1000000': also time today's exhaustive stage-0 search over that many centroids",
    )
    args = p.parse_args(argv)
    out = measure(args.home, args.space)
    dim = 64
    out["centroid_search"] = [centroid_search_ms(int(c), dim) for c in args.centroids.split(",") if c]
    print(json.dumps(out, indent=2, default=lambda v: float(v) if isinstance(v, np.floating) else str(v)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
