"""Elimination-compensation (derived here; the paper's own formula was not available): remove weight w_ij and
shift bias b_i by the delta that best preserves the network output.

With the output linearised, removing w_ij changes it by df = G_i(x) delta - H_ij(x) w_ij, where
G_i = df/db_i and H_ij = df/dw_ij are per-sample Jacobians from autodiff (for a conv weight, G and H sum over
positions, so the same formula covers the channel bias). Minimising E||df||^2 over delta gives
delta* = w E[G.H] / E[G.G] and the score s = w^2 (E[H.H] - E[G.H]^2 / E[G.G]); the lowest scores are pruned
and the deltas of a neuron's removed weights are added to its bias."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from models.networks import Classifier
from models.pruning.masks import Scope, apply_masks, prunable_weights, select_masks
from models.pruning.registry import Calibration, register_method
from models.pruning.surgery import _unfold

__all__ = [
    "JacobianMoments",
    "jacobian_moments",
    "jacobian_moments_vmap",
    "score_elimination_compensation",
    "compensation_shifts",
    "prune_in_rounds",
]


@dataclass(frozen=True)
class JacobianMoments:
    """Per weight tensor: E[H.H] (weight shape), E[G.H] (weight shape), E[G.G] (one per output unit)."""

    hh: torch.Tensor
    gh: torch.Tensor
    gg: torch.Tensor


def _bias_name(weight_name: str) -> str:
    return weight_name.rsplit(".", 1)[0] + ".bias"


@torch.no_grad()
def _accumulate(moments: dict[str, list[torch.Tensor]], jac: dict[str, torch.Tensor], names: list[str]) -> None:
    for name in names:
        h = jac[name].double()  # (batch, outputs, *weight shape)
        g = jac[_bias_name(name)].double()  # (batch, outputs, units)
        g_b = g.reshape(*g.shape, *([1] * (h.dim() - g.dim())))
        moments[name][0] += h.pow(2).sum((0, 1))
        moments[name][1] += (g_b * h).sum((0, 1))
        moments[name][2] += g.pow(2).sum((0, 1))


def jacobian_moments_vmap(model: Classifier, x: torch.Tensor, chunk: int = 32) -> dict[str, JacobianMoments]:
    """Reference implementation (slow): materialises every per-sample Jacobian with vmap over `jacrev`."""
    model.eval()
    names = list(prunable_weights(model))
    wanted = {n: p.detach() for n, p in model.named_parameters() if n in names or n in map(_bias_name, names)}
    others = {n: p.detach() for n, p in model.named_parameters() if n not in wanted}

    def logits(params: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**params, **others}, (xi.unsqueeze(0),)).squeeze(0)

    per_sample = vmap(jacrev(logits), in_dims=(None, 0))
    moments = {
        n: [
            torch.zeros(wanted[n].shape, dtype=torch.float64),
            torch.zeros(wanted[n].shape, dtype=torch.float64),
            torch.zeros(wanted[_bias_name(n)].shape, dtype=torch.float64),
        ]
        for n in names
    }
    x = x.float()
    for start in range(0, len(x), chunk):
        _accumulate(moments, per_sample(wanted, x[start : start + chunk]), names)
    count = float(len(x))
    return {n: JacobianMoments(*(m / count for m in moments[n])) for n in names}


def jacobian_moments(model: Classifier, x: torch.Tensor) -> dict[str, JacobianMoments]:
    """Sample means of the Jacobian products from one backward pass per output (autodiff), without
    materialising per-sample Jacobians: for a Linear layer H = g a^T, so E[H.H] = E[g^2]^T-weighted a^2 sums;
    for a conv layer H sums over positions, formed per output on the unfolded input."""
    model.eval()
    layers = model.weight_layers()
    names = list(prunable_weights(model))
    inputs: list[torch.Tensor] = [torch.empty(0)] * len(layers)
    outputs: list[torch.Tensor] = [torch.empty(0)] * len(layers)

    def keep(i: int):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            inputs[i] = inp[0].detach()
            out.retain_grad()
            outputs[i] = out

        return hook

    handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    try:
        with torch.enable_grad():
            logits = model(x.float())
    finally:
        for h in handles:
            h.remove()
    unfolded = [
        _unfold(layer, inp).reshape(len(x), -1, layer.weight[0].numel()).double()
        if isinstance(layer, (nn.Conv1d, nn.Conv2d))
        else inp.double()
        for layer, inp in zip(layers, inputs, strict=True)
    ]
    hh = [torch.zeros(layer.weight.shape[0], layer.weight[0].numel(), dtype=torch.float64) for layer in layers]
    gh = [torch.zeros_like(t) for t in hh]
    gg = [torch.zeros(layer.weight.shape[0], dtype=torch.float64) for layer in layers]
    for m in range(logits.shape[1]):
        for out in outputs:
            out.grad = None
        logits[:, m].sum().backward(retain_graph=m < logits.shape[1] - 1, inputs=outputs)
        for i, layer in enumerate(layers):
            g_out = outputs[i].grad.double()
            if isinstance(layer, nn.Linear):
                q = g_out.pow(2)  # (samples, units): G.G per sample for this output
                hh[i] += q.T @ unfolded[i].pow(2)
                gh[i] += q.T @ unfolded[i]
                gg[i] += q.sum(0)
            else:
                g_pos = g_out.reshape(len(x), g_out.shape[1], -1)  # (samples, units, positions)
                H = torch.einsum("nop,npk->nok", g_pos, unfolded[i])
                G = g_pos.sum(2)
                hh[i] += H.pow(2).sum(0)
                gh[i] += torch.einsum("no,nok->ok", G, H)
                gg[i] += G.pow(2).sum(0)
    model.zero_grad(set_to_none=True)
    count = float(len(x))
    return {
        n: JacobianMoments(
            hh[i].reshape(layer.weight.shape) / count, gh[i].reshape(layer.weight.shape) / count, gg[i] / count
        )
        for i, (n, layer) in enumerate(zip(names, layers, strict=True))
    }


def _per_weight(w: torch.Tensor, m: JacobianMoments) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, delta) per weight; a unit whose bias has no effect on the output (dead) gets no shift."""
    gg = m.gg.reshape(*m.gg.shape, *([1] * (w.dim() - 1)))
    alive = gg > 1e-12 * m.gg.max().clamp_min(1e-300)
    ratio = torch.where(alive, m.gh / gg.clamp_min(1e-300), torch.zeros_like(m.gh))
    w64 = w.detach().double()
    score = w64.pow(2) * (m.hh - torch.where(alive, m.gh * ratio, torch.zeros_like(m.gh))).clamp_min(0.0)
    return score, w64 * ratio


def compensation_shifts(
    model: Classifier, calibration: Calibration, masks: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Bias shift per unit: the sum of the optimal deltas of its removed weights (exact for one unit under
    the linearisation, since the deltas of one unit add up). Layers are compensated from input to output, each
    with moments of the network whose earlier layers are already pruned and compensated: moments of the dense
    network overshoot at high sparsity, where the later layers' inputs have moved (measured in docs/pruning.md)."""
    work = copy.deepcopy(model).eval()
    params = dict(work.named_parameters())
    shifts = {}
    for n in prunable_weights(work):
        if n not in masks:
            continue
        moments = jacobian_moments(work, calibration.x)
        _, delta = _per_weight(params[n], moments[n])
        removed = (~masks[n].bool()).double()
        shift = (delta * removed).reshape(delta.shape[0], -1).sum(1)
        shifts[_bias_name(n)] = shift
        with torch.no_grad():
            params[n].mul_(masks[n].to(params[n].dtype))
            params[_bias_name(n)].add_(shift.to(params[n].dtype))
    return shifts


@register_method("elimination-compensation", kind="unstructured", compensate=compensation_shifts)
def score_elimination_compensation(model: Classifier, calibration: Calibration) -> dict[str, torch.Tensor]:
    """Output change after removal and optimal bias compensation (autodiff Jacobian); unlabelled data."""
    moments = jacobian_moments(model, calibration.x)
    weights = prunable_weights(model)
    return {n: _per_weight(weights[n], moments[n])[0] for n in weights}


def prune_in_rounds(model: Classifier, keep: float, calibration: Calibration, scope: Scope, rounds: int) -> Classifier:
    """Elimination-compensation in `rounds` steps, each removing an equal share (1 - keep) / rounds of the weights:
    scores and bias shifts are recomputed on the network pruned and compensated so far, so each linearisation
    only has to hold for a smaller change (one-shot shifts add up and overshoot at high sparsity).
    Removed weights stay removed. `rounds=1` is the one-shot method (`prune(..., "elimination-compensation")`)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    pruned = copy.deepcopy(model).eval()
    kept: dict[str, torch.Tensor] | None = None
    for t in range(1, rounds + 1):
        scores = score_elimination_compensation(pruned, calibration)
        if kept is not None:
            scores = {n: s.masked_fill(~kept[n], -torch.inf) for n, s in scores.items()}
        kept = select_masks(scores, 1.0 - t * (1.0 - keep) / rounds if t < rounds else keep, scope)
        shifts = compensation_shifts(pruned, calibration, kept)
        apply_masks(pruned, kept)
        params = dict(pruned.named_parameters())
        with torch.no_grad():
            for name, shift in shifts.items():
                params[name].add_(shift.to(params[name].dtype))
    return pruned
