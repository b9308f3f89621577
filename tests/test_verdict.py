"""`prune` and `gadget` end with one line that weighs the stored model against what exists (a pruned model
against registered models of its kind pruned as much or more; a gadget against mean_logit), and `prune` into a
home that lacks the model refuses without writing anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pruning_fixtures import digits, trained

from models.evaluation import accuracy
from models.manifest import Manifest
from models.registry import ModelRegistry
from service.cli import main
from service.commands.verdict import gadget_verdict, prune_verdict


def _manifest(name: str, flops: int, acc: float, dataset: str = "digits", kind: str = "mlp") -> Manifest:
    spec = {"kind": kind, "input_dim": 64, "num_classes": 10, "hidden": [8], "channels": [], "kernel_size": 3}
    return Manifest(
        name=name,
        version=1,
        spec=spec,
        dataset=dataset,
        flops_dense_kernel=flops,
        flops_nonzero=flops,
        accuracy=acc,
        sha256="0" * 64,
    )


def test_a_pruned_model_is_weighed_against_models_pruned_as_much_or_more() -> None:
    new = _manifest("mlp-m20", 2000, 0.892)
    m10 = _manifest("mlp-m10", 1000, 0.972)
    dense = _manifest("dense", 10_000, 0.99)
    line = prune_verdict(new, [new, m10, dense])
    assert line == (
        "verdict: worse than what exists: mlp-m10:1, at 0.50x of its nonzero FLOPs, has test accuracy 0.972 against "
        "0.892; serve mlp-m10 instead"
    )
    assert "the most accurate of 2 models" in prune_verdict(_manifest("good", 2000, 0.98), [m10, dense])
    assert "cheaper than every registered classifier" in prune_verdict(_manifest("tiny", 500, 0.5), [m10, dense])
    # other data, the same name and unmeasured models are no yardstick
    others = [_manifest("x", 100, 0.99, dataset="mnist1d"), _manifest("mlp-m20", 100, 0.99)]
    assert "nothing of its kind" in prune_verdict(new, others)


@pytest.mark.parametrize(
    ("ours", "mean", "expected"),
    [
        (0.70, 0.80, "verdict: worse than mean_logit (n-accuracy 0.700 against 0.800 for mean_logit on 1000"),
        (0.90, 0.80, "verdict: better than mean_logit (n-accuracy 0.900 against 0.800 for mean_logit on 1000"),
        (0.852, 0.863, "verdict: not better than mean_logit (n-accuracy 0.852 against 0.863 for mean_logit on 1000"),
    ],
)
def test_a_gadget_is_weighed_against_mean_logit(ours: float, mean: float, expected: str) -> None:
    record = {"val_n_accuracy": {"lstm": ours, "mean_logit": mean}, "tuples": {"val": 1000}}
    line = gadget_verdict("pair-s10:1", "lstm", record)
    assert line.startswith(expected) and "\n" not in line


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    registry = ModelRegistry(tmp_path / "registry")
    model = trained("mlp")
    s = digits()
    registry.register("dense", model, accuracy=accuracy(model, s.x_test, s.y_test), dataset="digits")
    return tmp_path


def test_prune_prints_the_verdict_that_its_manifests_call_for(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    base = ["prune", "--home", str(home), "--from", "dense"]
    assert main([*base, "--method", "magnitude", "--keep", "0.1", "--finetune-epochs", "2", "--name", "m10"]) == 0
    capsys.readouterr()
    assert main([*base, "--method", "random", "--keep", "0.2", "--name", "m20"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("registered m20:1")  # no JSON unless asked
    registry = ModelRegistry(home / "registry")
    m10, m20 = registry.manifest("m10"), registry.manifest("m20")
    assert m10.flops_nonzero < m20.flops_nonzero
    if m10.accuracy > m20.accuracy:
        assert lines[1].startswith("verdict: worse than what exists: m10:1") and "serve m10 instead" in lines[1]
    else:
        assert lines[1].startswith("verdict: the most accurate of")
    assert main([*base, "--method", "magnitude", "--keep", "0.3", "--name", "m30", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{") :])["name"] == "m30"


def test_prune_into_a_home_without_the_model_refuses_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "var-lab"
    argv = ["prune", "--home", str(home), "--from", "dense", "--method", "magnitude", "--keep", "0.2"]
    assert main([*argv, "--name", "cnn-m20"]) == 2
    err = capsys.readouterr().err
    assert f"no model 'dense' in {home}: its registry is empty" in err and "--home" in err
    assert not home.exists()
    gadget = ["gadget", "--home", str(home), "--variant", "pair-s10"]
    assert main(gadget) == 2 and "no model 'pair-s10'" in capsys.readouterr().err
    assert not home.exists()
