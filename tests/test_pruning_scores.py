"""Unstructured scores against hand computations, SynFlow's data-freeness, elimination-compensation's claim."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from pruning_fixtures import calibration, digits, trained

from models.networks import Classifier, build_network
from models.pruning import Calibration, apply_masks, list_methods, prune, select_masks
from models.pruning.elimination import (
    compensation_shifts,
    jacobian_moments,
    jacobian_moments_vmap,
    score_elimination_compensation,
)
from models.pruning.unstructured import score_grasp, score_snip, score_synflow
from models.spec import NetworkSpec
from models.training import TrainConfig, train_classifier


def _tiny() -> tuple[Classifier, Calibration]:
    torch.manual_seed(3)
    model = build_network(NetworkSpec("mlp", 3, 2, hidden=(4,))).eval()
    x = torch.randn(6, 3)
    return model, Calibration(x=x, y=torch.tensor([0, 1, 1, 0, 1, 0]))


def _hand_gradients(W1: torch.Tensor, b1: torch.Tensor, W2: torch.Tensor, b2: torch.Tensor, cal: Calibration):  # type: ignore[no-untyped-def]
    """Backpropagation written out for a one-hidden-layer ReLU MLP with mean cross-entropy (no autograd)."""
    x = cal.x.double()
    Y = F.one_hot(cal.y, 2).double()
    z1 = x @ W1.T + b1
    h = z1.clamp_min(0)
    p = torch.softmax(h @ W2.T + b2, dim=1)
    dz2 = (p - Y) / len(x)
    dW2 = dz2.T @ h
    dz1 = (dz2 @ W2) * (z1 > 0).double()
    return dz1.T @ x, dW2


def _params(model: Classifier) -> list[torch.Tensor]:
    lin, head = model.body[0], model.head
    return [t.detach().double() for t in (lin.weight, lin.bias, head.weight, head.bias)]


def test_snip_matches_hand_computed_scores() -> None:
    model, cal = _tiny()
    W1, b1, W2, b2 = _params(model)
    g1, g2 = _hand_gradients(W1, b1, W2, b2, cal)
    scores = score_snip(model, cal)
    torch.testing.assert_close(scores["body.0.weight"].double(), (g1 * W1).abs(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(scores["head.weight"].double(), (g2 * W2).abs(), rtol=1e-4, atol=1e-7)


def test_grasp_matches_hand_computed_hessian_gradient_product() -> None:
    model, cal = _tiny()
    W1, b1, W2, b2 = _params(model)
    g1, g2 = _hand_gradients(W1, b1, W2, b2, cal)
    eps = 1e-6  # H g by central differences of the hand-written gradient along g (weights only)
    p1, p2 = _hand_gradients(W1 + eps * g1, b1, W2 + eps * g2, b2, cal)
    m1, m2 = _hand_gradients(W1 - eps * g1, b1, W2 - eps * g2, b2, cal)
    hg1, hg2 = (p1 - m1) / (2 * eps), (p2 - m2) / (2 * eps)
    scores = score_grasp(model, cal)
    torch.testing.assert_close(scores["body.0.weight"].double(), -W1 * hg1, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(scores["head.weight"].double(), -W2 * hg2, rtol=1e-3, atol=1e-6)


class _Poison:
    """Any attempt to read calibration data fails the test."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"SynFlow read calibration.{name}")


def test_synflow_touches_no_data_and_matches_its_hand_computed_first_round() -> None:
    model = trained("mlp")
    torch.manual_seed(0)
    with_poison = prune(model, "synflow", 0.2, _Poison())  # type: ignore[arg-type]
    without = prune(model, "synflow", 0.2, None)
    for a, b in zip(with_poison.parameters(), without.parameters(), strict=True):
        assert torch.equal(a, b)
    tiny, _ = _tiny()
    W1, b1, W2, _ = (t.abs() for t in _params(tiny))
    h = W1.sum(1) + b1  # all-ones input, |weights|: every ReLU is in its linear regime
    first = score_synflow(tiny, None, keep=1.0)
    torch.testing.assert_close(first["head.weight"], W2 * h[None, :])
    torch.testing.assert_close(first["body.0.weight"], W1 * W2.sum(0)[:, None])
    assert first["body.0.weight"].dtype == torch.float64


def test_synflow_iterates_rounds_and_respects_keep() -> None:
    model = trained("mlp")
    one_shot = select_masks(score_synflow(model, None, keep=0.05, rounds=1), 0.05)
    iterative = select_masks(score_synflow(model, None, keep=0.05, rounds=20), 0.05)
    assert sum(int(m.sum()) for m in iterative.values()) == sum(int(m.sum()) for m in one_shot.values())
    assert any(not torch.equal(one_shot[k], iterative[k]) for k in one_shot)


def _loss(model: Classifier) -> float:
    s = digits()
    with torch.no_grad():
        return float(F.cross_entropy(model(torch.as_tensor(s.x_test)), torch.as_tensor(s.y_test)))


@pytest.mark.parametrize("keep", [0.5, 0.3])
def test_elimination_compensation_lowers_the_loss_right_after_pruning(keep: float) -> None:
    model, cal = trained("mlp"), calibration("mlp", labels=False)
    masks = select_masks(score_elimination_compensation(model, cal), keep)
    shifts = compensation_shifts(model, cal, masks)
    assert any(float(s.abs().max()) > 0 for s in shifts.values())
    uncompensated = apply_masks(copy.deepcopy(model), masks)
    compensated = prune(model, "elimination-compensation", keep, cal)
    for name, w in compensated.named_parameters():  # the very same mask, only the biases differ
        if name.endswith("weight"):
            assert torch.equal(w, dict(uncompensated.named_parameters())[name])
    assert _loss(compensated) < _loss(uncompensated)


def test_elimination_compensation_reduces_to_variance_with_a_constant_jacobian() -> None:
    """A linear network has a constant Jacobian J_i: s = ||J_i||^2 w^2 Var(a_j)."""
    torch.manual_seed(0)
    model = build_network(NetworkSpec("mlp", 5, 3, hidden=(4,))).eval()
    with torch.no_grad():  # make the hidden layer linear on these inputs: large positive bias, positive inputs
        model.body[0].bias.fill_(100.0)
    x = torch.rand(64, 5) * 0.1
    cal = Calibration(x=x)
    scores = score_elimination_compensation(model, cal)
    w1 = model.body[0].weight.detach().double()
    var = x.double().var(0, unbiased=False)
    jj = model.head.weight.detach().double().pow(2).sum(0)  # ||J_i||^2 = ||column i of the head||^2
    torch.testing.assert_close(scores["body.0.weight"], jj[:, None] * w1.pow(2) * var[None, :], rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("method", [m.name for m in list_methods() if m.kind == "unstructured"])
def test_masked_weights_stay_zero_through_fine_tuning(method: str) -> None:
    torch.manual_seed(0)
    s = digits()
    pruned = prune(trained("mlp"), method, 0.2, calibration("mlp"))
    zeros = {n: w == 0 for n, w in pruned.named_parameters() if n.endswith("weight")}
    config = TrainConfig(epochs=1, patience=1, seed=0, progress=False)
    train_classifier(pruned, s.x_train[:400], s.y_train[:400], s.x_val, s.y_val, config)
    for n, w in pruned.named_parameters():
        if n.endswith("weight"):
            assert bool((w[zeros[n]] == 0).all()), n
            assert int((w != 0).sum()) <= int((~zeros[n]).sum())


@pytest.mark.parametrize("kind", ["mlp", "cnn2d", "cnn1d"])
def test_jacobian_moments_match_materialised_per_sample_jacobians(kind: str) -> None:
    model, x = trained(kind), calibration(kind, size=64).x
    fast, slow = jacobian_moments(model, x), jacobian_moments_vmap(model, x)
    for name in slow:
        for field in ("hh", "gh", "gg"):
            torch.testing.assert_close(getattr(fast[name], field), getattr(slow[name], field), rtol=1e-5, atol=1e-9)
