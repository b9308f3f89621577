"""One suite every registered pruning method must pass; a newly registered method is tested automatically."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pruning_fixtures import calibration, trained

from models.flops import count_flops
from models.networks import Classifier, build_network
from models.pruning import list_methods, prune, sparsity
from models.pruning.budgets import layer_budgets, uniform_budgets
from models.pruning.masks import prunable_weights
from models.pruning.registry import get_method
from service.commands import methods as methods_command

ALL = [m.name for m in list_methods()]
UNSTRUCTURED = [m.name for m in list_methods() if m.kind == "unstructured"]
STRUCTURED = [m.name for m in list_methods() if m.kind == "structured"]
GLOBAL_STRUCTURED = {"act-grad", "random-channel"}


def _expected_flops(model: Classifier) -> int:
    """FLOPs of the spec's widths computed by hand (2 x multiply-adds), not by the hook counter."""
    spec = model.spec
    total, in_ch = 0, 1
    if spec.kind != "mlp":
        side = spec.input_dim if spec.kind == "cnn1d" else spec.image_side
        k = spec.kernel_size if spec.kind == "cnn1d" else spec.kernel_size**2
        for out_ch in spec.channels:
            positions = side if spec.kind == "cnn1d" else side * side
            total += 2 * in_ch * out_ch * k * positions
            in_ch, side = out_ch, side // 2
        width = in_ch * spec.conv_output_size()
    else:
        width = spec.input_dim
    for out in [*spec.hidden, spec.num_classes]:
        total += 2 * width * out
        width = out
    return total


@pytest.mark.parametrize("method", ALL)
def test_method_is_listed_documented_and_checks_its_data(method: str, capsys: pytest.CaptureFixture[str]) -> None:
    spec = get_method(method)
    assert spec.summary, f"{method} needs a one-line docstring"
    methods_command.run(None)  # type: ignore[arg-type]
    assert any(line.split()[0] == method for line in capsys.readouterr().out.splitlines())
    if spec.needs_data:
        with pytest.raises(ValueError, match="needs"):
            prune(trained("mlp"), method, 0.5, None)
    if spec.needs_labels:
        with pytest.raises(ValueError, match="labelled"):
            prune(trained("mlp"), method, 0.5, calibration("mlp", labels=False))


@pytest.mark.parametrize("kind", ["mlp", "cnn2d"])
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("method", UNSTRUCTURED)
def test_unstructured_exact_sparsity(method: str, scope: str, kind: str) -> None:
    torch.manual_seed(0)
    model = trained(kind)
    before = copy.deepcopy(model.state_dict())
    keep = 0.3
    pruned = prune(model, method, keep, calibration(kind), scope=scope)
    for k, v in model.state_dict().items():  # the input model is untouched
        assert torch.equal(v, before[k])
    weights = prunable_weights(pruned)
    total = sum(w.numel() for w in weights.values())
    nonzero = sum(int(torch.count_nonzero(w)) for w in weights.values())
    if scope == "global":
        assert nonzero == round(keep * total)
    else:
        for w in weights.values():
            assert int(torch.count_nonzero(w)) == max(1, round(keep * w.numel()))
    assert sparsity(pruned) == pytest.approx(1 - nonzero / total)
    for name, w in weights.items():
        mask = dict(pruned.named_modules())[name.rsplit(".", 1)[0]].weight_mask
        assert torch.equal(w == 0, mask == 0) or bool((w[mask == 0] == 0).all())
    flops = count_flops(pruned, pruned.spec.input_dim)
    assert flops.dense_kernel == _expected_flops(pruned)
    assert flops.nonzero < flops.dense_kernel
    assert torch.isfinite(pruned(calibration(kind).x[:8])).all()


@pytest.mark.parametrize("reweight", [False, True])
@pytest.mark.parametrize("kind", ["mlp", "cnn2d", "cnn1d"])
@pytest.mark.parametrize("method", STRUCTURED)
def test_structured_is_physically_smaller(method: str, kind: str, reweight: bool) -> None:
    torch.manual_seed(0)
    model = trained(kind)
    keep = 0.25
    pruned = prune(model, method, keep, calibration(kind), reweight=reweight)
    budgets = uniform_budgets(model.spec.widths, keep)
    if method in GLOBAL_STRUCTURED:
        assert sum(pruned.spec.widths) == sum(budgets) and min(pruned.spec.widths) >= 1
    else:
        assert pruned.spec.widths == budgets
    fresh = build_network(pruned.spec)
    assert all(p.shape == q.shape for p, q in zip(pruned.parameters(), fresh.parameters(), strict=True))
    n_params = sum(p.numel() for p in pruned.parameters())
    assert n_params == sum(p.numel() for p in fresh.parameters()) < sum(p.numel() for p in model.parameters())
    flops = count_flops(pruned, pruned.spec.input_dim)
    assert flops.dense_kernel == _expected_flops(pruned) < _expected_flops(model)
    assert torch.isfinite(pruned(calibration(kind).x[:8])).all()


@pytest.mark.parametrize("method", STRUCTURED)
def test_structured_equal_error_budget_fits_the_uniform_flops(method: str) -> None:
    torch.manual_seed(0)
    model, cal = trained("mlp"), calibration("mlp")
    budgets = layer_budgets(model, 0.25, "equal-error", cal.x)
    assert all(1 <= b <= w for b, w in zip(budgets, model.spec.widths, strict=True))
    pruned = prune(model, method, 0.25, cal, reweight=True, budget="equal-error")
    uniform = prune(model, "layer-weight-norm", 0.25, cal)
    if method not in GLOBAL_STRUCTURED:
        assert pruned.spec.widths == budgets
        assert _expected_flops(pruned) <= _expected_flops(uniform)
    assert math.isfinite(float(pruned(cal.x[:4]).detach().sum()))
