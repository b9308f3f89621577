"""Bring your own data: whole clusters split, a separate space file, classes from the data, the
user's cluster ids, item ids and labels kept in the space, meta.json as built, variant names from the arch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cascade.bootstrap import build_space_dir
from cascade.bootstrap_config import BootstrapConfig, default_stages, variant_name
from cascade.space import META_FILE, Space, build_space
from models.data import DatasetError, load_dataset

LABELS = (2, 7, 9)


def user_npz(path: Path, clusters: int = 120, size: int = 6, ids: bool = True, **extra: np.ndarray) -> Path:
    """Separable data with the user's own cluster ids (1000 + 7i), labels {2, 7, 9} and item ids."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(len(LABELS), 8)) * 3
    which = rng.integers(0, len(LABELS), clusters)
    y_index = np.repeat(which, size)
    x = (centers[y_index] + rng.normal(size=(clusters * size, 8))).astype(np.float32)
    arrays = {"x": x, "y": np.array(LABELS)[y_index], "cluster": np.repeat(1000 + 7 * np.arange(clusters), size)}
    if ids:
        arrays["id"] = 500_000 + 3 * np.arange(clusters * size)
    np.savez(path, **{**arrays, **extra})
    return path


def test_whole_clusters_go_either_to_training_or_to_the_space(tmp_path: Path) -> None:
    data = np.load(user_npz(tmp_path / "mine.npz"))
    s = load_dataset(str(tmp_path / "mine.npz"))
    assert s.split == "clusters"
    cluster_of = {row.tobytes(): c for row, c in zip(data["x"], data["cluster"], strict=True)}
    trained = {cluster_of[r.tobytes()] for part in (s.x_train, s.x_val, s.x_test) for r in part}
    assert s.cluster_pool is not None
    assert not trained & set(s.cluster_pool.tolist())  # no cluster lends members to training
    sizes = np.unique(s.cluster_pool, return_counts=True)[1]
    assert sizes.min() == sizes.max() == 6  # every space cluster keeps all its members
    total = sum(len(p) for p in (s.x_train, s.x_val, s.x_test, s.x_pool))
    assert total == len(data["x"]) and 0.3 < len(s.x_pool) / total < 0.6
    again = load_dataset(str(tmp_path / "mine.npz"))
    np.testing.assert_array_equal(s.cluster_pool, again.cluster_pool)  # seeded: prune re-cuts alike
    # the space serves all of it, each item tagged with the part its cluster went to
    corpus = s.served
    assert corpus is s.corpus and corpus.part is not None and len(corpus.x) == len(data["x"])
    np.testing.assert_array_equal(corpus.ids, data["id"])
    for code, part in enumerate((s.cluster_train, s.cluster_val, s.cluster_test, s.cluster_pool)):
        assert set(corpus.cluster[corpus.part == code].tolist()) == set(part.tolist())


def test_the_space_serves_every_cluster_and_says_which_ones_the_models_saw(tmp_path: Path) -> None:
    """Users index everything they have: every cluster of the file is in the space (the models still train on a
    split of them), and the space records, per cluster and in total, which split each one went to."""
    data = np.load(user_npz(tmp_path / "mine.npz"))
    splits = load_dataset(str(tmp_path / "mine.npz"))
    build_space_dir(tmp_path / "space", splits, BootstrapConfig(dataset=str(tmp_path / "mine.npz"), pair=None))
    space = Space.load(tmp_path / "space")
    assert space.num_items == len(data["x"]) and space.num_clusters == len(np.unique(data["cluster"]))
    parts = {
        "train": splits.cluster_train,
        "validation": splits.cluster_val,
        "test": splits.cluster_test,
        "pool": splits.cluster_pool,
    }
    for c in range(space.num_clusters):
        part = space.part_of(c)
        assert part is not None and int(space.cluster_ids[c]) in set(parts[part].tolist())  # type: ignore[index, union-attr]
    seen = space.meta["seen_by_models"]
    for name, ids in parts.items():
        assert ids is not None
        assert seen[name]["clusters"] == len(np.unique(ids)) and seen[name]["items"] == len(ids)
    assert seen["pool"]["use"].startswith("no model saw them")
    assert "every cluster" in space.meta["served"]


def test_classes_come_from_the_data_and_labels_are_remapped(tmp_path: Path) -> None:
    s = load_dataset(str(user_npz(tmp_path / "mine.npz")))
    assert s.num_classes == 3 and s.class_labels is not None and s.class_labels.tolist() == list(LABELS)
    assert set(np.unique(s.y_train).tolist()) == {0, 1, 2}  # trained on 0..C-1
    declared = load_dataset(str(user_npz(tmp_path / "declared.npz", classes=np.array([2, 5, 7, 9]))))
    assert declared.num_classes == 4 and declared.labels.tolist() == [2, 5, 7, 9]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"id": np.zeros(720, dtype=np.int64)}, "id must be unique per item; 0 appears twice"),
        ({"id": np.arange(10)}, "id must have one entry per row of x"),
        ({"cluster": np.linspace(0, 1, 720)}, "cluster must hold integers"),
        ({"y": np.full(720, -1)}, "labels must be non-negative"),
        ({"classes": np.array([2, 7])}, "y has labels [9] that classes does not declare"),
        ({"y": np.full(720, 4)}, "1 distinct label(s)"),
    ],
)
def test_bad_columns_are_refused_naming_the_column(tmp_path: Path, extra: dict, message: str) -> None:
    path = user_npz(tmp_path / "bad.npz", **extra)
    with pytest.raises(DatasetError) as exc:
        load_dataset(str(path))
    assert message in str(exc.value)


def test_an_array_the_format_does_not_know_is_refused_with_the_known_names(tmp_path: Path) -> None:
    """A misspelled `clusters` would lose the user's clusters and leak members of one cluster across the split."""
    path = tmp_path / "typo.npz"
    arrays = dict(np.load(user_npz(tmp_path / "mine.npz")))
    arrays["clusters"] = arrays.pop("cluster")
    np.savez(path, **arrays, extra=np.zeros(3))
    with pytest.raises(DatasetError) as exc:
        load_dataset(str(path))
    message = str(exc.value)
    assert "unknown arrays 'clusters' (did you mean 'cluster'?), 'extra'" in message
    assert "x and y, optionally cluster, id, classes" in message


def test_a_separate_space_file_is_the_space(tmp_path: Path) -> None:
    train = user_npz(tmp_path / "train.npz", clusters=60)
    space = user_npz(tmp_path / "space.npz", clusters=20, ids=True)
    s = load_dataset(str(train), space_dataset=str(space))
    assert len(s.x_pool) == 120 and s.space_source == str(space)
    assert sum(len(p) for p in (s.x_train, s.x_val, s.x_test)) == 360  # the training file, all of it
    np.testing.assert_array_equal(s.x_pool, np.load(space)["x"])
    other = tmp_path / "narrow.npz"
    np.savez(other, x=np.zeros((12, 3), np.float32), y=np.repeat([2, 7], 6))
    with pytest.raises(DatasetError, match="items have 3 features, the training file's have 8"):
        load_dataset(str(train), space_dataset=str(other))


def test_a_label_only_in_the_space_is_refused(tmp_path: Path) -> None:
    train = user_npz(tmp_path / "train.npz", clusters=30)
    space = tmp_path / "space.npz"
    np.savez(space, x=np.zeros((6, 8), np.float32), y=np.full(6, 11))
    with pytest.raises(DatasetError, match=r"labels \[11\] occur in the space but not in the training split"):
        load_dataset(str(train), space_dataset=str(space))


def test_the_space_keeps_the_users_ids_and_labels(tmp_path: Path) -> None:
    splits = load_dataset(str(user_npz(tmp_path / "mine.npz")))
    config = BootstrapConfig(dataset=str(tmp_path / "mine.npz"), arch="mlp", pair=None)
    space_dir = tmp_path / "space"
    build_space_dir(space_dir, splits, config)
    space = Space.load(space_dir)
    corpus = splits.served
    assert corpus.cluster is not None and corpus.ids is not None
    assert space.cluster_ids.tolist() == sorted(set(corpus.cluster.tolist()))  # type: ignore[union-attr]
    assert all((c - 1000) % 7 == 0 for c in space.cluster_ids.tolist())  # type: ignore[union-attr]
    assert space.labels_known == list(LABELS)
    for c in (0, space.num_clusters - 1):  # every member of a cluster is the user's member of that cluster
        rows = range(int(space.offsets[c]), int(space.offsets[c + 1]))
        user_items = {int(space.item_ids[r]) for r in rows}  # type: ignore[index]
        expected = {int(i) for i, k in zip(corpus.ids, corpus.cluster, strict=True) if k == space.cluster_ids[c]}  # type: ignore[index]
        assert user_items == expected
    first = int(space.cluster_ids[3])  # type: ignore[index]
    assert space.cluster_of(first) == 3 and space.cluster_of(5) is None and space.cluster_of(2**70) is None
    row = 17
    assert space.item_of(int(space.item_ids[row])) == row and space.item_of(-1) is None  # type: ignore[index]
    assert space.class_of(7) == 1 and space.class_of(3) is None

    meta = json.loads((space_dir / META_FILE).read_text())
    assert meta["clusters"] == "given" and "cluster_size" not in meta  # no made-up size for given clusters
    assert meta["cluster_sizes"] == {"min": 6, "median": 6.0, "max": 6}
    assert meta["classes"] == list(LABELS) and meta["split"] == "clusters" and meta["item_ids"] == "given"
    assert meta["dataset"] == str(tmp_path / "mine.npz")


def test_built_clusters_say_how_and_default_ids_are_positions(tmp_path: Path) -> None:
    path = tmp_path / "plain.npz"
    rng = np.random.default_rng(1)
    np.savez(path, x=rng.normal(size=(500, 4)).astype(np.float32), y=rng.integers(3, 6, 500))
    splits = load_dataset(str(path))
    assert splits.split == "items"
    build_space_dir(tmp_path / "s", splits, BootstrapConfig(dataset=str(path), arch="mlp", cluster_size=5, pair=None))
    space = Space.load(tmp_path / "s")
    meta = space.meta
    assert meta["clusters"] == "same-label" and meta["cluster_size"] == 5 and meta["item_ids"] == "rows"
    assert meta["cluster_sizes"]["max"] == 5 and meta["classes"] == [3, 4, 5]
    np.testing.assert_array_equal(space.cluster_ids, np.arange(space.num_clusters))  # type: ignore[arg-type]
    np.testing.assert_array_equal(space.item_ids, np.arange(space.num_items))  # type: ignore[arg-type]


def test_spaces_saved_before_ids_load_with_positions(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    space = build_space(rng.normal(size=(30, 3)), np.arange(30) % 2, np.array([0.5, 0.5]), np.arange(30) // 5)
    d = tmp_path / "old"
    d.mkdir()
    np.savez(
        d / "space.npz",
        features=space.features,
        labels=space.labels,
        offsets=space.offsets,
        cluster_labels=space.cluster_labels,
        prior=space.prior,
    )
    (d / META_FILE).write_text("{}")
    old = Space.load(d)
    assert old.cluster_ids.tolist() == list(range(6)) and old.labels_known == [0, 1]  # type: ignore[union-attr]
    assert old.item_of(29) == 29 and old.item_of(30) is None


def test_variants_are_named_by_the_network_kind() -> None:
    mlp = BootstrapConfig(dataset="x.npz", arch="mlp")
    assert [v.name for v in mlp.variants] == ["mlp-s25", "mlp-s50", "mlp-m10"]  # type: ignore[union-attr]
    assert [s.variant for s in mlp.stages] == ["mlp-s25", "mlp-s50", "dense"]  # type: ignore[union-attr]
    assert [v.name for v in BootstrapConfig().variants] == ["cnn-s25", "cnn-s50", "cnn-m10"]  # type: ignore[union-attr]
    assert variant_name("cnn2d", "s", 0.5) == "cnn2d-s50"
    assert default_stages("mlp", "big")[-1].variant == "big"


def test_bootstrap_from_a_training_file_and_a_space_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from models.registry import ModelRegistry
    from service.cli import main

    train = user_npz(tmp_path / "train.npz", clusters=60)
    space = user_npz(tmp_path / "space.npz", clusters=25)
    home = tmp_path / "home"
    argv = ["bootstrap", "--dataset", str(train), "--space-dataset", str(space), "--home", str(home)]
    assert main([*argv, "--epochs", "2", "--quiet", "--no-pair"]) == 0
    meta = json.loads((home / "spaces" / "default" / META_FILE).read_text())
    assert meta["space_dataset"] == str(space) and meta["dataset"] == str(train)
    assert meta["num_items"] == 150 and meta["num_clusters"] == 25  # the whole space file, nothing trained on
    dense = ModelRegistry(home / "registry").manifest("dense")
    assert dense.extra["data_args"]["space_dataset"] == str(space)
    # `prune` re-cuts the training file as the bootstrap did (train/val/test only), from the manifest
    prune = ["prune", "--home", str(home), "--from", "dense", "--method", "magnitude", "--keep", "0.3"]
    assert main([*prune, "--name", "mlp-m30"]) == 0
    assert "registered mlp-m30:1" in capsys.readouterr().out
    assert main(["bootstrap", "--dataset", "digits", "--space-dataset", str(space), "--home", str(tmp_path / "x")]) == 2
    assert "--space-dataset: needs --dataset to be your own training .npz" in capsys.readouterr().err
