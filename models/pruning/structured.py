"""Structured baselines of paper 002, one pure function per method:
`select(model, calibration, budgets) -> [kept unit indices per prunable layer]`. Layerwise methods keep
exactly `budgets[i]` units of layer i; global methods (`act-grad`, `random-channel`) keep `sum(budgets)` units
in total, at least one per layer, distributed by their scores. Every method pairs with `--reweight`."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from models.networks import Classifier
from models.pruning.registry import Calibration, register_method
from models.pruning.surgery import columns_of

__all__ = [
    "outgoing_weight_norms",
    "top_units",
    "global_top_units",
    "unit_activations_and_grads",
    "select_layer_weight_norm",
    "select_act_grad",
    "select_layer_act_grad",
    "select_layer_sampling",
    "select_layer_greedy_fs",
    "select_random_channel",
    "select_layer_random_channel",
]


def outgoing_weight_norms(model: Classifier, p: float = 2.0) -> list[torch.Tensor]:
    """For every prunable layer, the p-norm of each unit's outgoing weights in the next layer."""
    layers = model.weight_layers()
    norms = []
    for i in range(len(layers) - 1):
        nxt = layers[i + 1].weight.detach()
        units = layers[i].weight.shape[0]
        if isinstance(layers[i + 1], nn.Linear):
            group = nxt.shape[1] // units
            cols = nxt[:, columns_of(torch.arange(units), group)]
            norms.append(cols.reshape(nxt.shape[0], units, group).transpose(0, 1).reshape(units, -1).norm(p=p, dim=1))
        else:
            norms.append(nxt.transpose(0, 1).reshape(units, -1).norm(p=p, dim=1))
    return norms


def top_units(scores: list[torch.Tensor], budgets: list[int]) -> list[torch.Tensor]:
    """The `budget` highest-scoring units of every layer, sorted by index."""
    return [torch.topk(s, b).indices.sort().values for s, b in zip(scores, budgets, strict=True)]


def global_top_units(scores: list[torch.Tensor], budgets: list[int]) -> list[torch.Tensor]:
    """`sum(budgets)` units across all layers by score, at least the best unit of every layer (no layer dies)."""
    total = sum(budgets)
    flat = torch.cat([s.double() for s in scores])
    offsets = torch.tensor([0, *[len(s) for s in scores]]).cumsum(0)
    forced = torch.stack([offsets[i] + torch.argmax(s) for i, s in enumerate(scores)])
    rest = flat.clone()
    rest[forced] = torch.inf
    chosen = torch.topk(rest, total).indices
    return [
        (chosen[(chosen >= offsets[i]) & (chosen < offsets[i + 1])] - offsets[i]).sort().values
        for i in range(len(scores))
    ]


def unit_activations_and_grads(
    model: Classifier, calibration: Calibration
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Per prunable layer, its units' outputs as (samples, units, positions) and, when labels are given, the
    gradient of the cross-entropy with respect to them (the input of the next layer, after ReLU and pooling)."""
    layers = model.weight_layers()
    captured: list[torch.Tensor] = []

    def grab(_m: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        t = inp[0]
        if t.requires_grad:
            t.retain_grad()
        captured.append(t)

    handles = [layer.register_forward_pre_hook(grab) for layer in layers[1:]]
    model.eval()
    try:
        with torch.enable_grad():
            x = calibration.x.float().requires_grad_(calibration.y is not None)
            out = model(x)
            if calibration.y is not None:
                F.cross_entropy(out, calibration.y.long()).backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    result = []
    for i, t in enumerate(captured):
        units = layers[i].weight.shape[0]
        a = t.detach().reshape(len(t), units, -1)
        g = t.grad.detach().reshape(len(t), units, -1) if t.grad is not None else None
        result.append((a, g))
    return result


def _act_grad_scores(model: Classifier, calibration: Calibration) -> list[torch.Tensor]:
    """|sum over positions of activation x gradient|, averaged over samples (first-order Taylor)."""
    return [(a * g).sum(2).abs().mean(0) for a, g in unit_activations_and_grads(model, calibration) if g is not None]


@register_method("layer-weight-norm", kind="structured", needs_data=False)
def select_layer_weight_norm(
    model: Classifier, calibration: Calibration | None, budgets: list[int]
) -> list[torch.Tensor]:
    """Per layer, keep the units whose outgoing weights have the largest l1 norm."""
    return top_units(outgoing_weight_norms(model, p=1.0), budgets)


@register_method("act-grad", kind="structured", needs_labels=True)
def select_act_grad(model: Classifier, calibration: Calibration, budgets: list[int]) -> list[torch.Tensor]:
    """Global: activation x gradient, l2-normalised per layer, best units across the network."""
    scores = [s / s.norm().clamp_min(1e-12) for s in _act_grad_scores(model, calibration)]
    return global_top_units(scores, budgets)


@register_method("layer-act-grad", kind="structured", needs_labels=True)
def select_layer_act_grad(model: Classifier, calibration: Calibration, budgets: list[int]) -> list[torch.Tensor]:
    """Per layer, keep the units with the largest activation x gradient."""
    return top_units(_act_grad_scores(model, calibration), budgets)


@register_method("layer-sampling", kind="structured")
def select_layer_sampling(model: Classifier, calibration: Calibration, budgets: list[int]) -> list[torch.Tensor]:
    """Per layer, sample units without replacement with probability ~ sensitivity (activation x weight)."""
    norms = outgoing_weight_norms(model, p=1.0)
    kept = []
    for (a, _), w, k in zip(unit_activations_and_grads(model, Calibration(calibration.x)), norms, budgets, strict=True):
        contrib = a.abs().sum(2) * w  # (samples, units)
        sens = (contrib / contrib.sum(1, keepdim=True).clamp_min(1e-12)).max(0).values
        probs = sens.double() + 1e-9 * float(sens.max().clamp_min(1e-12))
        kept.append(torch.multinomial(probs, k, replacement=False).sort().values)
    return kept


def _tail_after(model: Classifier, layer: nn.Module) -> list[nn.Module]:
    mods = [*model.body, model.head]
    return mods[mods.index(layer) + 1 :]


@torch.no_grad()
def _layer_greedy_fs_one(model: Classifier, i: int, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Start with every unit of layer i removed, add back the unit that lowers the batch loss most."""
    layers = model.weight_layers()
    nxt = layers[i + 1]
    captured: list[torch.Tensor] = []
    handle = nxt.register_forward_pre_hook(lambda _m, inp: captured.append(inp[0]))
    try:
        model(x)
    finally:
        handle.remove()
    inp = captured[0]
    units = layers[i].weight.shape[0]
    per_unit = inp.reshape(len(inp), units, -1)
    bias = nxt.bias.detach()
    contrib = torch.stack(
        [
            nxt((per_unit * F.one_hot(torch.tensor(u), units).to(inp.dtype)[None, :, None]).reshape(inp.shape))
            - bias.reshape(1, -1, *([1] * (inp.dim() - 2)))
            for u in range(units)
        ]
    )  # (units, samples, *next output)
    rest = nn.Sequential(*_tail_after(model, nxt))
    current = bias.reshape(1, -1, *([1] * (inp.dim() - 2))).expand_as(contrib[0]).clone()
    chosen: list[int] = []
    taken = torch.zeros(units, dtype=torch.bool)
    for _ in range(k):
        cand = current.unsqueeze(0) + contrib  # (units, samples, ...)
        logits = rest(cand.reshape(-1, *cand.shape[2:]))
        loss = F.cross_entropy(logits, y.repeat(units), reduction="none").reshape(units, -1).mean(1)
        loss[taken] = torch.inf
        u = int(torch.argmin(loss))
        chosen.append(u)
        taken[u] = True
        current += contrib[u]
    return torch.tensor(chosen, dtype=torch.long).sort().values


@register_method("layer-greedy-fs", kind="structured", needs_labels=True)
def select_layer_greedy_fs(
    model: Classifier, calibration: Calibration, budgets: list[int], batch: int = 128
) -> list[torch.Tensor]:
    """Per layer from input to output: add back units one by one by the largest decrease of the batch loss."""
    assert calibration.y is not None
    x, y = calibration.x[:batch].float(), calibration.y[:batch].long()
    work = copy.deepcopy(model).eval()
    layers = work.weight_layers()
    kept = []
    for i, k in enumerate(budgets):
        s = _layer_greedy_fs_one(work, i, x, y, k)
        kept.append(s)
        removed = torch.ones(layers[i].weight.shape[0], dtype=torch.bool)
        removed[s] = False
        with torch.no_grad():
            layers[i].weight[removed] = 0.0
            layers[i].bias[removed] = 0.0
    return kept


def _random_scores(model: Classifier) -> list[torch.Tensor]:
    return [torch.rand(layer.weight.shape[0]) for layer in model.weight_layers()[:-1]]


@register_method("random-channel", kind="structured", needs_data=False)
def select_random_channel(model: Classifier, calibration: Calibration | None, budgets: list[int]) -> list[torch.Tensor]:
    """Global: random units across the whole network (at least one per layer)."""
    return global_top_units(_random_scores(model), budgets)


@register_method("layer-random-channel", kind="structured", needs_data=False)
def select_layer_random_channel(
    model: Classifier, calibration: Calibration | None, budgets: list[int]
) -> list[torch.Tensor]:
    """Per layer, random units."""
    return top_units(_random_scores(model), budgets)
