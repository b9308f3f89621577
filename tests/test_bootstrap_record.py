"""A bootstrap that fails leaves nothing behind, and one that succeeds describes itself: `bootstrap.json` lists
only the settings that shaped the run, and the command says which relevance grades it chose."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_byod_data import user_npz
from test_byod_pair import views_npz

from cascade.bootstrap_config import BootstrapConfig
from cascade.bootstrap_record import describe_run
from models.data import load_dataset
from service.cli import main


def _label_only_in_the_space(tmp_path: Path) -> list[str]:
    train = user_npz(tmp_path / "train.npz", clusters=30)
    space = tmp_path / "space.npz"
    np.savez(space, x=np.zeros((6, 8), np.float32), y=np.full(6, 11))
    return ["--dataset", str(train), "--space-dataset", str(space)]


@pytest.mark.parametrize("existing", [False, True], ids=["missing-home", "empty-home"])
def test_a_refused_bootstrap_writes_nothing(tmp_path: Path, existing: bool, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    if existing:
        home.mkdir()
    argv = ["bootstrap", *_label_only_in_the_space(tmp_path), "--home", str(home), "--quiet", "--no-pair"]
    assert main(argv) == 2
    assert "labels [11] occur in the space but not in the training split" in capsys.readouterr().err
    assert home.exists() == existing and (not existing or not any(home.iterdir()))


def test_a_bootstrap_that_fails_half_way_into_a_fresh_home_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The cnn2d network is refused when it is built (8 features are not a square image): after the run has
    started writing."""
    home = tmp_path / "home"
    data = user_npz(tmp_path / "mine.npz")
    argv = ["bootstrap", "--dataset", str(data), "--arch", "cnn2d", "--home", str(home), "--quiet", "--no-pair"]
    assert main([*argv, "--epochs", "1"]) == 2
    assert "cnn2d needs a square input" in capsys.readouterr().err
    assert not home.exists()


def test_a_half_built_home_is_never_taken_for_a_fresh_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A home that held something keeps what a failed run wrote (a later run may resume it), but it now belongs
    to that run's data: a run with other data is refused."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("the user's own file")
    data = user_npz(tmp_path / "mine.npz")
    argv = ["bootstrap", "--dataset", str(data), "--arch", "cnn2d", "--home", str(home), "--quiet", "--no-pair"]
    assert main([*argv, "--epochs", "1"]) == 2
    assert (home / "notes.txt").read_text() == "the user's own file"
    record = json.loads((home / "bootstrap.json").read_text())
    assert record["state"] == "building" and record["dataset"] == str(data)
    capsys.readouterr()
    other = user_npz(tmp_path / "other.npz", clusters=60)
    assert main(["bootstrap", "--dataset", str(other), "--home", str(home), "--quiet", "--no-pair"]) == 2
    err = capsys.readouterr().err
    assert f"was bootstrapped with dataset={str(data)!r} (that run did not complete)" in err


def test_the_record_of_a_users_run_lists_only_what_shaped_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = views_npz(tmp_path / "views.npz", structured=True, prototypes=120)
    home = tmp_path / "home"
    argv = ["bootstrap", "--dataset", str(data), "--home", str(home), "--quiet", "--epochs", "2"]
    assert main([*argv, "--pair-steps", "60"]) == 0
    out = capsys.readouterr().out
    text = (home / "bootstrap.json").read_text()
    record = json.loads(text)
    assert record["state"] == "complete" and record["dataset"] == str(data)
    for unused in ("final_seq_length", "num_prototypes", "num_samples", "cluster_size", "kmeans_clusters"):
        assert unused not in text  # MNIST-1D's sample count and prototype spaces; clusters were given
    assert record["pair"]["training"]["steps"] == 60 and record["pair"]["stages"]
    grades = record["grades"]
    assert grades["num_grades"] in (2, 3)
    assert f"relevance grades: {grades['decision']}; default gains {grades['gains']}" in out  # which it chose
    # before any step: how long the run will take, probed on this machine; recorded beside what it took
    assert out.splitlines()[0].startswith("bootstrap: about ")
    estimate = record["estimate"]
    assert set(estimate["steps"]) == {
        "dense classifier",
        "pruned classifiers",
        "dense pair model (pair-dense)",
        "pruned pair models",
        "bi-encoder",
        "space and indexes",
        "tuning on dev queries",
    }
    assert "listwise:" in estimate["how"]["dense pair model (pair-dense)"]  # both phases of its training probed
    assert estimate["seconds"] > 0 and estimate["probe_seconds"] > 0  # (a step may round to 0.0 s on tiny data)
    assert record["seconds"] > 0
    assert main([*argv, "--pair-steps", "60"]) == 0  # a complete home: nothing to estimate, nothing rebuilt
    assert "bootstrap: about" not in capsys.readouterr().out


def test_the_builtin_records_keep_what_describes_them() -> None:
    mnist1d = describe_run(BootstrapConfig(), None, None)
    assert mnist1d["pair"]["space"]["final_seq_length"] == 40 and mnist1d["num_samples"] == 52_000
    assert "cluster_size" not in mnist1d and "user_pair" not in mnist1d  # prototype views, not label chunks
    digits = describe_run(BootstrapConfig(dataset="digits", arch="mlp", pair=None), None, None)
    assert digits["cluster_size"] == 10 and "num_samples" not in digits and digits["pair"] is None


def test_kmeans_clusters_are_recorded_with_their_k(tmp_path: Path) -> None:
    path = tmp_path / "plain.npz"
    rng = np.random.default_rng(1)
    np.savez(path, x=rng.normal(size=(300, 4)).astype(np.float32), y=rng.integers(0, 3, 300))
    config = BootstrapConfig(dataset=str(path), arch="mlp", kmeans_clusters=12, pair=None)
    record = describe_run(config, load_dataset(str(path)), None)
    assert record["kmeans_clusters"] == 12 and "cluster_size" not in record
    plain = describe_run(replace(config, kmeans_clusters=0), load_dataset(str(path)), None)
    assert plain["cluster_size"] == 10 and "kmeans_clusters" not in plain
