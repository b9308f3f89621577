"""The structured space, member sampling and the FAISS cluster index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cascade.index import INDEX_FILE, ClusterIndex
from cascade.npz_map import load_npz_mapped
from cascade.space import SPACE_FILE, Space, build_space, clusters_by_kmeans, clusters_by_label, sample_members


def _space(n: int = 300, size: int = 7, seed: int = 0) -> Space:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    features = (labels[:, None] * 5.0 + rng.normal(size=(n, 4))).astype(np.float32)
    cluster = clusters_by_label(labels, size, rng)
    return build_space(features, labels, np.full(3, 1 / 3), cluster, {"id": "t"})


def test_clusters_share_one_label_and_rows_are_grouped() -> None:
    space = _space()
    assert space.meta["purity"] == 1.0
    for c in range(space.num_clusters):
        members = space.labels[space.offsets[c] : space.offsets[c + 1]]
        assert (members == space.cluster_labels[c]).all()
        assert 1 <= len(members) <= 7
    assert space.offsets[-1] == space.num_items == 300


def test_sampling_is_without_replacement_and_uniform() -> None:
    space = _space()
    clusters = np.arange(space.num_clusters)
    rng = np.random.default_rng(1)
    hits = np.zeros(space.num_items)
    for _ in range(400):
        rows, counts = sample_members(space.offsets, clusters, 3, rng)
        assert counts.sum() == len(rows)
        np.testing.assert_array_equal(counts, np.minimum(space.sizes, 3))
        start = 0
        for c, n in zip(clusters, counts, strict=True):
            chunk = rows[start : start + n]
            assert len(set(chunk.tolist())) == n  # distinct members
            assert ((chunk >= space.offsets[c]) & (chunk < space.offsets[c + 1])).all()
            start += n
        hits[rows] += 1
    # each member of a full cluster of 7 is drawn with probability 3/7 per round
    full = np.repeat(space.sizes == 7, space.sizes)
    rate = hits[full] / 400
    assert abs(rate.mean() - 3 / 7) < 0.01 and rate.min() > 0.3 and rate.max() < 0.56


def test_sampling_all_members_when_n_exceeds_size() -> None:
    space = _space()
    rows, counts = sample_members(space.offsets, np.array([2, 0]), 100, np.random.default_rng(0))
    expected = np.r_[np.arange(space.offsets[2], space.offsets[3]), np.arange(space.offsets[0], space.offsets[1])]
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_array_equal(counts, space.sizes[[2, 0]])


def test_index_finds_the_cluster_of_an_item_and_round_trips(tmp_path) -> None:
    space = _space()
    index = ClusterIndex.build(space)
    assert index.num_clusters == space.num_clusters
    assert sum(index.list_size(c) for c in range(space.num_clusters)) == space.num_items
    centroids = space.centroids()
    nearest = index.nearest_clusters(centroids[[5]], 3)
    assert nearest[0] == 5 and len(nearest) == 3
    index.save(tmp_path)
    space.save(tmp_path)
    again = ClusterIndex.load(tmp_path)
    np.testing.assert_array_equal(
        again.nearest_clusters(centroids[[5, 9]], 4), index.nearest_clusters(centroids[[5, 9]], 4)
    )
    loaded = Space.load(tmp_path)
    np.testing.assert_array_equal(loaded.features, space.features)
    assert loaded.meta == space.meta


def test_centroids_are_the_quantizer_s_own_rows_built_or_loaded(tmp_path) -> None:
    space = _space()
    built = ClusterIndex.build(space)
    built.save(tmp_path)
    clusters = np.array([7, 0, space.num_clusters - 1, 7])
    for index in (built, ClusterIndex.load(tmp_path)):
        stored = np.stack([index.ivf.quantizer.reconstruct(int(c)) for c in clusters])
        got = index.centroids(clusters)
        assert got.dtype == np.float32 and np.array_equal(got, stored)
        np.testing.assert_allclose(got, space.centroids()[clusters], rtol=1e-5, atol=1e-6)
    assert index.centroids(np.array([], dtype=np.int64)).shape == (0, space.features.shape[1])


def test_a_loaded_index_maps_its_item_vectors_and_survives_the_file_being_replaced(tmp_path) -> None:
    """Worker processes share the index file's pages instead of each holding its items' vectors: the file is
    mapped, and a new index saved over it (by rename) leaves the loaded one answering as before."""
    space = _space()
    built = ClusterIndex.build(space)
    built.save(tmp_path)
    loaded = ClusterIndex.load(tmp_path)
    path = str((tmp_path / INDEX_FILE).resolve())
    maps = Path("/proc/self/smaps").read_text().splitlines()
    assert any(line.rstrip().endswith(path) for line in maps), "the index file is not mapped"
    sizes = [loaded.list_size(c) for c in range(space.num_clusters)]
    assert sizes == [built.list_size(c) for c in range(space.num_clusters)]
    before = loaded.nearest_clusters(space.centroids()[[2, 7]], 5)
    ClusterIndex.from_vectors(space.features[::-1] * 2.0, space.offsets).save(tmp_path)  # other centroids
    assert not np.array_equal(ClusterIndex.load(tmp_path).nearest_clusters(space.centroids()[[2, 7]], 5), before)
    np.testing.assert_array_equal(loaded.nearest_clusters(space.centroids()[[2, 7]], 5), before)
    assert [loaded.list_size(c) for c in range(space.num_clusters)] == sizes


def test_a_loaded_space_maps_its_arrays_from_its_file_read_only(tmp_path) -> None:
    """Worker processes share the space's arrays as they share the item cache: every array is a read-only view of
    the mapped file, equal to what was saved, and a space saved over it later leaves the loaded one as it was."""
    space = _space()
    space.save(tmp_path)
    loaded = Space.load(tmp_path)
    path = str((tmp_path / SPACE_FILE).resolve())
    maps = Path("/proc/self/smaps").read_text().splitlines()
    assert any(line.rstrip().endswith(path) for line in maps), "the space file is not mapped"
    for name in ("features", "labels", "offsets", "cluster_labels", "prior", "cluster_ids", "item_ids"):
        saved, got = getattr(space, name), getattr(loaded, name)
        np.testing.assert_array_equal(got, saved)
        assert got.dtype == saved.dtype and not got.flags.writeable, name
    with pytest.raises(ValueError, match="read-only"):
        loaded.features[0, 0] = 1.0
    before = loaded.features.copy()
    build_space(space.features * 2.0, space.labels, space.prior, np.zeros(len(space.labels), int), {"id": "u"}).save(
        tmp_path
    )
    assert Space.load(tmp_path).meta["id"] == "u"
    np.testing.assert_array_equal(loaded.features, before)


def test_compressed_or_empty_members_of_an_npz_load_as_np_load_reads_them(tmp_path) -> None:
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "empty": np.zeros((0, 3)), "f": np.ones((2, 3)).T}
    np.savez_compressed(tmp_path / "c.npz", **arrays)
    np.savez(tmp_path / "s.npz", **arrays)
    for name in ("c.npz", "s.npz"):
        got = load_npz_mapped(tmp_path / name)
        assert set(got) == set(arrays)
        for key, want in arrays.items():
            np.testing.assert_array_equal(got[key], want)
            assert got[key].shape == want.shape and got[key].dtype == want.dtype
    np.savez(tmp_path / "o.npz", o=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match="object arrays"):
        load_npz_mapped(tmp_path / "o.npz")


def test_kmeans_partition_when_there_are_no_clusters() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (50, 2)), rng.normal(5, 0.1, (50, 2))]).astype(np.float32)
    cluster = clusters_by_kmeans(x, 2, seed=0)
    assert len(np.unique(cluster[:50])) == 1 and len(np.unique(cluster[50:])) == 1
    assert cluster[0] != cluster[99]


def test_build_space_rejects_ragged_input() -> None:
    with pytest.raises(ValueError, match="one row per item"):
        build_space(np.zeros((3, 2)), np.zeros(2, int), np.ones(2) / 2, np.zeros(3, int))


def test_sampling_uneven_clusters_uses_the_sorted_path_and_stays_uniform() -> None:
    # one cluster of 400 beside 50 clusters of 2: a dense key matrix would be mostly padding
    sizes = np.r_[400, np.full(50, 2)]
    offsets = np.r_[0, np.cumsum(sizes)]
    clusters = np.arange(len(sizes))
    rng = np.random.default_rng(3)
    hits = np.zeros(offsets[-1])
    for _ in range(300):
        rows, counts = sample_members(offsets, clusters, 5, rng)
        np.testing.assert_array_equal(counts, np.minimum(sizes, 5))
        big = rows[:5]
        assert len(set(big.tolist())) == 5 and (big < 400).all()
        np.testing.assert_array_equal(np.sort(rows[5:]), np.arange(400, offsets[-1]))  # small ones: all members
        hits[rows] += 1
    rate = hits[:400] / 300  # each member of the big cluster: 5/400 per round
    assert abs(rate.mean() - 5 / 400) < 1e-9 and rate.max() < 0.06


def test_sampling_one_member_is_uniform_within_each_cluster() -> None:
    sizes = np.array([1, 2, 5, 10, 3])
    offsets = np.r_[0, np.cumsum(sizes)]
    clusters = np.array([4, 0, 3, 1, 2])  # any order: rows follow it
    rng = np.random.default_rng(7)
    hits = np.zeros(offsets[-1])
    rounds = 4000
    for _ in range(rounds):
        rows, counts = sample_members(offsets, clusters, 1, rng)
        np.testing.assert_array_equal(counts, np.ones(len(clusters)))
        assert ((rows >= offsets[clusters]) & (rows < offsets[clusters + 1])).all()
        hits[rows] += 1
    expected = np.repeat(1 / sizes, sizes)  # each member of a cluster of s: 1/s per round
    np.testing.assert_allclose(hits / rounds, expected, atol=0.035)
