"""`prunecascade prune` and `prunecascade methods` end to end on a registered digits MLP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pruning_fixtures import digits, trained

from models.evaluation import accuracy
from models.pruning import list_methods
from models.registry import ModelRegistry
from service.cli import main


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    registry = ModelRegistry(tmp_path / "registry")
    model = trained("mlp")
    s = digits()
    registry.register("dense", model, accuracy=accuracy(model, s.x_test, s.y_test), dataset="digits")
    return tmp_path


def test_methods_lists_every_registered_method(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == [m.name for m in list_methods()]


@pytest.mark.parametrize(
    "flags",
    [
        ["--method", "magnitude", "--scope", "layer"],
        ["--method", "greedy-sequential", "--reweight", "--budget", "equal-error"],
        ["--method", "layer-act-grad", "--finetune-epochs", "1"],
    ],
)
def test_prune_writes_an_entry_with_flops_accuracy_and_deviation(home: Path, flags: list[str]) -> None:
    torch.manual_seed(0)
    argv = ["prune", "--home", str(home), "--from", "dense", "--keep", "0.25", "--name", "small", *flags]
    assert main(argv) == 0
    registry = ModelRegistry(home / "registry")
    m, parent = registry.manifest("small"), registry.manifest("dense")
    assert m.method == flags[1] and m.keep == 0.25
    assert m.flops_nonzero < parent.flops_nonzero
    assert 0.0 <= m.accuracy <= 1.0
    assert m.output_deviation > 0.0
    assert m.extra["reweight"] == ("--reweight" in flags)
    loaded = registry.load("small").model
    s = digits()
    assert accuracy(loaded, s.x_test, s.y_test) == pytest.approx(m.accuracy)


def test_prune_rejects_an_unknown_method(home: Path) -> None:
    argv = ["prune", "--home", str(home), "--from", "dense", "--method", "nope", "--keep", "0.5", "--name", "x"]
    assert main(argv) == 2
