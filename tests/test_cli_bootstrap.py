"""`prunecascade bootstrap --dataset PATH.npz [--arch] [--home]`: what the README used to ask Python for."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from cascade.bootstrap_config import BootstrapConfig
from cascade.config import CONFIG_FILE, CascadeConfig
from cascade.space import META_FILE
from models.registry import ModelRegistry
from service.cli import build_parser, main
from service.commands.bootstrap import config_from


def _npz(path: Path, labels: tuple[int, ...] = (2, 7, 9), clusters: int = 90, size: int = 6) -> Path:
    """Separable user data with its own cluster ids (1000 + 7i) and labels that are not 0..C-1."""
    rng = np.random.default_rng(0)
    centers = {lab: rng.normal(size=12) * 3 for lab in labels}
    y_c = np.array(labels)[rng.integers(0, len(labels), clusters)]
    y = np.repeat(y_c, size)
    x = np.stack([centers[lab] + rng.normal(size=12) for lab in y]).astype(np.float32)
    np.savez(path, x=x, y=y, cluster=np.repeat(1000 + 7 * np.arange(clusters), size))
    return path


def _args(*argv: str) -> argparse.Namespace:
    return build_parser("bootstrap").parse_args(["bootstrap", *argv])


def test_flags_map_onto_the_bootstrap_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _npz(tmp_path / "mine.npz")
    monkeypatch.chdir(tmp_path)
    config = config_from(_args("--dataset", "mine.npz", "--epochs", "5", "--kmeans-clusters", "30"))
    expected = BootstrapConfig(dataset=str(tmp_path / "mine.npz"), arch="mlp", epochs=5, kmeans_clusters=30)
    assert config == expected  # a relative path is recorded absolute: later commands may run elsewhere
    assert config_from(_args("--dataset", "mine.npz", "--arch", "cnn1d")).arch == "cnn1d"
    assert config_from(_args()) == BootstrapConfig()  # no flags: the embedded MNIST-1D default, unchanged
    assert config_from(_args("--dataset", "digits")).arch == "mlp"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset", "data.csv"], "--dataset: expected mnist1d, digits or a path ending in .npz"),
        (["--dataset", "missing.npz"], "--dataset: no such file"),
        (["--epochs", "0"], "--epochs: must be >= 1"),
        (["--cluster-size", "-3"], "--cluster-size: must be >= 1"),
        (["--kmeans-clusters", "0"], "--kmeans-clusters: must be >= 1"),
    ],
)
def test_bad_flags_are_refused_before_anything_is_written(
    tmp_path: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    assert main(["bootstrap", "--home", str(home), "--quiet", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not home.exists()


def test_an_unknown_arch_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bootstrap", "--home", str(tmp_path), "--arch", "transformer"])
    assert exc.value.code == 2


def test_bootstrap_a_users_npz_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _npz(tmp_path / "mine.npz")
    home = tmp_path / "var-mine"
    argv = ["bootstrap", "--dataset", str(data), "--home", str(home), "--epochs", "2", "--quiet", "--no-pair"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"prunecascade serve --home {home}" in out
    registry = ModelRegistry(home / "registry")
    dense = registry.manifest("dense")
    assert dense.spec["kind"] == "mlp" and dense.spec["input_dim"] == 12
    meta = json.loads((home / "spaces" / "default" / META_FILE).read_text())
    assert meta["clusters"] == "given"  # the user's cluster column was used, not same-label chunks
    assert json.loads((home / "bootstrap.json").read_text())["dataset"] == str(data)
    assert CascadeConfig.load(home / CONFIG_FILE).stages[-1].variant == "dense"

    # a second run is a no-op; another dataset on the same home is refused, naming what it was built from
    assert main(argv) == 0
    other = _npz(tmp_path / "other.npz", labels=(0, 1))
    assert main(["bootstrap", "--dataset", str(other), "--home", str(home), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"was bootstrapped with dataset={str(data)!r}" in err and "--home" in err
