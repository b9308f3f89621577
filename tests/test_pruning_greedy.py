"""Submodular greedy selection and least-squares reweighting."""

from __future__ import annotations

import pytest
import torch
from pruning_fixtures import calibration, trained

from models.networks import Classifier
from models.pruning import list_methods, prune
from models.pruning.budgets import uniform_budgets
from models.pruning.greedy import greedy_select, naive_greedy_select, problem_grams, reconstruction_objective
from models.pruning.registry import get_method
from models.pruning.surgery import columns_of, layer_inputs, layer_problem, least_squares_weights, shrink

SELECTING = [m.name for m in list_methods() if m.kind == "structured" and not m.builds_network]


def _problem(kind: str, i: int):  # type: ignore[no-untyped-def]
    model = trained(kind)
    x = calibration(kind).x.float()
    return layer_problem(model, i, layer_inputs(model, x)[i + 1])


@pytest.mark.parametrize(("kind", "layer", "k"), [("mlp", 1, 8), ("mlp", 0, 6), ("cnn2d", 0, 3), ("cnn2d", 1, 3)])
def test_incremental_greedy_selects_the_same_set_as_naive_lstsq_greedy(kind: str, layer: int, k: int) -> None:
    problem = _problem(kind, layer)
    B = problem.A @ problem.W.T
    G, C, total = problem_grams(problem.A, B)
    fast = greedy_select(G, C, k, problem.group, total)
    slow = naive_greedy_select(problem.A, B, k, problem.group)
    assert fast.order.tolist() == slow.tolist()
    assert float(fast.normalised_objective()[-1]) == pytest.approx(
        reconstruction_objective(problem.A, B, fast.kept(), problem.group), abs=1e-6
    )


def _kept_by(method: str, model: Classifier, keep: float) -> list[torch.Tensor]:
    torch.manual_seed(0)
    budgets = uniform_budgets(model.spec.widths, keep)
    return get_method(method).fn(model, calibration("mlp"), budgets)  # type: ignore[return-value]


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.1])
def test_greedy_objective_beats_every_baseline_on_the_same_layer_and_k(keep: float) -> None:
    model = trained("mlp")
    x = calibration("mlp").x.float()
    inputs = layer_inputs(model, x)
    greedy = _kept_by("greedy-layer", model, keep)
    for method in SELECTING:
        if method == "greedy-layer":
            continue
        for i, kept in enumerate(_kept_by(method, model, keep)):
            problem = layer_problem(model, i, inputs[i + 1])
            B = problem.A @ problem.W.T
            G, C, total = problem_grams(problem.A, B)
            g = greedy_select(G, C, len(kept), problem.group, total).kept()
            f_greedy = reconstruction_objective(problem.A, B, g, problem.group)
            assert f_greedy >= reconstruction_objective(problem.A, B, kept, problem.group) - 1e-9, (method, i)
    assert len(greedy) == 2


def _reconstruction_error(problem, kept: torch.Tensor, W_new: torch.Tensor) -> float:  # type: ignore[no-untyped-def]
    cols = columns_of(kept, problem.group)
    B = (problem.A @ problem.W.T).double()
    return float((B - problem.A[:, cols].double() @ W_new.double().T).pow(2).sum())


@pytest.mark.parametrize("kind", ["mlp", "cnn2d"])
@pytest.mark.parametrize("method", SELECTING)
def test_reweighting_never_increases_the_reconstruction_error(method: str, kind: str) -> None:
    model = trained(kind)
    cal = calibration(kind)
    torch.manual_seed(1)
    kept = get_method(method).fn(model, cal, uniform_budgets(model.spec.widths, 0.25))
    inputs = layer_inputs(model, cal.x.float())
    for i, k in enumerate(kept):  # type: ignore[arg-type]
        problem = layer_problem(model, i, inputs[i + 1])
        sliced = problem.W[:, columns_of(k, problem.group)]
        ls = least_squares_weights(problem, k)
        assert _reconstruction_error(problem, k, ls) <= _reconstruction_error(problem, k, sliced) * (1 + 1e-6)


def _masked_equivalent(model: Classifier, kept: list[torch.Tensor], reweight_x: torch.Tensor | None) -> Classifier:
    """Same width as `model`: removed units zeroed (rows and biases), next layers optionally given LS weights
    on the kept columns and zeros elsewhere."""
    import copy

    masked = copy.deepcopy(model)
    layers = masked.weight_layers()
    inputs = layer_inputs(model, reweight_x) if reweight_x is not None else None
    with torch.no_grad():
        for i, k in enumerate(kept):
            removed = torch.ones(layers[i].weight.shape[0], dtype=torch.bool)
            removed[k] = False
            layers[i].weight[removed] = 0.0
            layers[i].bias[removed] = 0.0
            if inputs is not None:
                problem = layer_problem(model, i, inputs[i + 1])
                full = torch.zeros_like(problem.W)
                full[:, columns_of(k, problem.group)] = least_squares_weights(problem, k).to(full.dtype)
                layers[i + 1].weight.copy_(full.reshape(layers[i + 1].weight.shape))
    return masked


@pytest.mark.parametrize("reweight", [False, True])
@pytest.mark.parametrize("kind", ["mlp", "cnn2d", "cnn1d"])
def test_shrunk_model_equals_the_masked_model(kind: str, reweight: bool) -> None:
    model = trained(kind)
    cal = calibration(kind)
    torch.manual_seed(0)
    kept = [torch.randperm(w)[: max(1, w // 3)].sort().values for w in model.spec.widths]
    x = cal.x.float()
    small = shrink(model, kept, x if reweight else None)
    masked = _masked_equivalent(model, kept, x if reweight else None)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in masked.parameters())
    torch.testing.assert_close(small(x), masked(x), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_greedy_variants_prune_to_the_same_widths_and_stay_close_to_the_dense_outputs() -> None:
    model, cal = trained("mlp"), calibration("mlp")
    variants = ["greedy-layer", "greedy-sequential", "greedy-asymmetric"]
    nets = {m: prune(model, m, 0.25, cal, reweight=True) for m in variants}
    assert len({tuple(n.spec.widths) for n in nets.values()}) == 1
    x = cal.x.float()
    dev = {m: float((n(x) - model(x)).norm() / model(x).norm()) for m, n in nets.items()}
    assert dev["greedy-asymmetric"] <= dev["greedy-layer"] + 1e-6 or dev["greedy-sequential"] <= dev["greedy-layer"]
    assert all(d < 1.0 for d in dev.values()), dev


def test_reweighting_lowers_calibration_output_deviation_for_greedy() -> None:
    model, cal = trained("mlp"), calibration("mlp")
    x = cal.x.float()
    with torch.no_grad():
        plain = prune(model, "greedy-layer", 0.25, cal)(x)
        reweighted = prune(model, "greedy-layer", 0.25, cal, reweight=True)(x)
        ref = model(x)
    assert (reweighted - ref).norm() < (plain - ref).norm()
