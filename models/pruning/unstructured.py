"""Unstructured scores, one pure function per method: `score(model, calibration) -> {weight name: scores}`
(higher means keep). The definitions are this project's, given with each function."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from models.networks import Classifier
from models.pruning.masks import Scope, prunable_weights, select_masks
from models.pruning.registry import Calibration, register_method

__all__ = ["score_magnitude", "score_random", "score_snip", "score_grasp", "score_synflow", "grasp_hessian_gradient"]


@register_method("magnitude", kind="unstructured", needs_data=False)
def score_magnitude(model: Classifier, calibration: Calibration | None = None) -> dict[str, torch.Tensor]:
    """|w|: the classic baseline; data-free."""
    return {name: w.detach().abs() for name, w in prunable_weights(model).items()}


@register_method("random", kind="unstructured", needs_data=False)
def score_random(model: Classifier, calibration: Calibration | None = None) -> dict[str, torch.Tensor]:
    """Uniform random scores (torch's global RNG, seeded by the caller): the floor every method must beat."""
    return {name: torch.rand(w.shape) for name, w in prunable_weights(model).items()}


def _loss_gradients(model: Classifier, calibration: Calibration, create_graph: bool = False) -> list[torch.Tensor]:
    params = list(prunable_weights(model).values())
    assert calibration.y is not None
    loss = F.cross_entropy(model(calibration.x.float()), calibration.y.long())
    return list(torch.autograd.grad(loss, params, create_graph=create_graph))


@register_method("snip", kind="unstructured", needs_labels=True)
def score_snip(model: Classifier, calibration: Calibration) -> dict[str, torch.Tensor]:
    """SNIP |g * w|: first-order saliency of the cross-entropy on the labelled calibration batch."""
    model.eval()
    grads = _loss_gradients(model, calibration)
    return {name: (g * w).detach().abs() for (name, w), g in zip(prunable_weights(model).items(), grads, strict=True)}


def grasp_hessian_gradient(model: Classifier, calibration: Calibration) -> list[torch.Tensor]:
    """H g by double backpropagation: the gradient of g . stop_grad(g)."""
    params = list(prunable_weights(model).values())
    grads = _loss_gradients(model, calibration, create_graph=True)
    z = sum((g * g.detach()).sum() for g in grads)
    return [h.detach() for h in torch.autograd.grad(z, params)]


@register_method("grasp", kind="unstructured", needs_labels=True)
def score_grasp(model: Classifier, calibration: Calibration) -> dict[str, torch.Tensor]:
    """GraSP -w * (H g), keep the highest (the original paper removes the highest instead)."""
    model.eval()
    hg = grasp_hessian_gradient(model, calibration)
    return {name: (-w.detach() * h) for (name, w), h in zip(prunable_weights(model).items(), hg, strict=True)}


@register_method("synflow", kind="unstructured", needs_data=False, wants_keep=True)
def score_synflow(
    model: Classifier,
    calibration: Calibration | None = None,
    *,
    keep: float = 1.0,
    scope: Scope = "global",
    rounds: int = 100,
) -> dict[str, torch.Tensor]:
    """SynFlow |w * dR/dw|, data-free, iterated on an exponential schedule in float64.

    R = sum of the output of the network with |weights| on an all-ones input. Pruning in rounds lets the
    scores of the survivors rise as their paths lose competitors, which avoids layer collapse. The returned
    scores are the last round's, with the weights pruned in earlier rounds at -1, so that `select_masks` at the
    same `keep` and `scope` returns exactly the mask of the last round."""
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    params = prunable_weights(net)
    originals = {name: w.detach().clone() for name, w in params.items()}
    masks = {name: torch.ones_like(w, dtype=torch.bool) for name, w in params.items()}
    ones = torch.ones(1, model.spec.input_dim, dtype=torch.float64)
    scores: dict[str, torch.Tensor] = {}
    rounds = rounds if keep < 1.0 else 1
    for r in range(1, rounds + 1):
        with torch.no_grad():
            for name, w in params.items():
                w.copy_(originals[name] * masks[name])
        net.zero_grad(set_to_none=True)
        net(ones).sum().backward()
        scores = {
            name: torch.where(masks[name], (w.grad * w).detach().abs(), torch.full_like(w, -1.0))
            for name, w in params.items()
        }
        masks = select_masks(scores, keep ** (r / rounds), scope)
    return scores
