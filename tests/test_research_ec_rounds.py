"""Elimination-compensation in rounds: one round is the one-shot method, exact kept counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.networks import build_network
from models.pruning import prune
from models.pruning.elimination import prune_in_rounds
from models.pruning.masks import prunable_weights
from models.pruning.registry import Calibration
from models.spec import NetworkSpec
from models.training import TrainConfig, train_classifier


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, Calibration]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 12)).astype(np.float32)
    y = x[:, :4].argmax(axis=1).astype(np.int64)
    torch.manual_seed(0)
    model = build_network(NetworkSpec("mlp", 12, 4, hidden=(24, 16)))
    train_classifier(model, x[:320], y[:320], x[320:], y[320:], TrainConfig(epochs=5, seed=0, progress=False))
    return model, Calibration(x=torch.as_tensor(x[:128]), y=torch.as_tensor(y[:128]))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_one_round_is_the_one_shot_method(trained, scope) -> None:
    model, cal = trained
    one = prune_in_rounds(model, 0.3, cal, scope, rounds=1)
    shot = prune(model, "elimination-compensation", 0.3, cal, scope=scope)
    for (n, a), (_, b) in zip(one.state_dict().items(), shot.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_rounds_keep_exact_counts_and_leave_the_input_alone(trained, scope) -> None:
    model, cal = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune_in_rounds(model, 0.2, cal, scope, rounds=3)
    weights = prunable_weights(pruned)
    if scope == "global":
        total = sum(w.numel() for w in weights.values())
        assert sum(int((w != 0).sum()) for w in weights.values()) == round(0.2 * total)
    else:
        for w in weights.values():
            assert int((w != 0).sum()) == max(1, round(0.2 * w.numel()))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    biases_moved = [
        not torch.equal(p, before[n]) for n, p in pruned.named_parameters() if n.endswith("bias") and n in before
    ]
    assert any(biases_moved)  # the shifts were applied


def test_rounds_must_be_positive(trained) -> None:
    model, cal = trained
    with pytest.raises(ValueError, match="rounds"):
        prune_in_rounds(model, 0.5, cal, "global", rounds=0)
