"""Structured surgery: capture what feeds each layer, pose the next layer as least squares, and rebuild a
physically smaller network. Unit j of a prunable layer owns a group of columns of the next layer's input:
one column (Linear -> Linear), kernel-size columns of the unfolded input (Conv -> Conv), or the channel's
spatial positions (Conv -> Flatten -> Linear)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.networks import Classifier, build_network

__all__ = [
    "LayerProblem",
    "layer_inputs",
    "layer_problem",
    "columns_of",
    "least_squares_weights",
    "shrink",
    "shrink_layer",
]


@torch.no_grad()
def layer_inputs(model: Classifier, x: torch.Tensor) -> list[torch.Tensor]:
    """The input tensor of every weight layer (head last) for a batch `x`."""
    layers = model.weight_layers()
    captured: list[torch.Tensor | None] = [None] * len(layers)
    handles = [
        layer.register_forward_hook(lambda _m, inp, _out, i=i: captured.__setitem__(i, inp[0].detach()))
        for i, layer in enumerate(layers)
    ]
    try:
        model.eval()
        model(x)
    finally:
        for h in handles:
            h.remove()
    return [c for c in captured if c is not None]


@dataclass(frozen=True)
class LayerProblem:
    """Layer i+1 seen as `A @ W.T`: A is (rows x columns), W is (out x columns), unit j of layer i owns
    columns `[j * group, (j + 1) * group)`. Rows are samples (times positions, for a conv)."""

    A: torch.Tensor
    W: torch.Tensor
    group: int

    @property
    def units(self) -> int:
        return self.A.shape[1] // self.group


def _unfold(layer: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    """im2col, channel-major, as (batch x positions, channels x kernel)."""
    if isinstance(layer, nn.Conv1d):
        k, p = layer.kernel_size[0], layer.padding[0]
        cols = F.unfold(inp.unsqueeze(2), (1, k), padding=(0, p))
    else:
        cols = F.unfold(inp, layer.kernel_size, padding=layer.padding)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _group(model: Classifier, i: int) -> int:
    layers = model.weight_layers()
    nxt = layers[i + 1]
    if isinstance(nxt, (nn.Conv1d, nn.Conv2d)):
        return nxt.weight[0, 0].numel()
    if isinstance(layers[i], (nn.Conv1d, nn.Conv2d)):
        return model.spec.conv_output_size()
    return 1


def layer_problem(model: Classifier, i: int, next_input: torch.Tensor) -> LayerProblem:
    """The least-squares problem of the layer after prunable layer `i`, given that layer's input batch."""
    nxt = model.weight_layers()[i + 1]
    if isinstance(nxt, (nn.Conv1d, nn.Conv2d)):
        A = _unfold(nxt, next_input)
    else:
        A = next_input.reshape(len(next_input), -1)
    W = nxt.weight.detach().reshape(nxt.weight.shape[0], -1)
    return LayerProblem(A=A.double(), W=W.double(), group=_group(model, i))


def columns_of(units: torch.Tensor, group: int) -> torch.Tensor:
    """Column indices owned by `units`, in unit order."""
    units = units.long()
    return (units[:, None] * group + torch.arange(group)[None, :]).reshape(-1)


def least_squares_weights(problem: LayerProblem, kept: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """argmin_W' ||A W.T - A_S W'.T||_F (the next layer refitted on the kept units), with a
    tiny ridge so rank-deficient A_S is safe."""
    cols = columns_of(kept, problem.group)
    A_s = problem.A[:, cols]
    target = problem.A @ problem.W.T
    gram = A_s.T @ A_s
    gram += ridge * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(len(cols), dtype=gram.dtype)
    return torch.linalg.solve(gram, A_s.T @ target).T


@torch.no_grad()
def shrink(
    model: Classifier,
    kept: list[torch.Tensor],
    calibration_x: torch.Tensor | None = None,
) -> Classifier:
    """A new, smaller network keeping units `kept[i]` of every prunable layer i. With `calibration_x`, the
    layer after each pruned one gets least-squares weights fitted on the original network's activations."""
    layers = model.weight_layers()
    if len(kept) != len(layers) - 1:
        raise ValueError(f"expected kept units for {len(layers) - 1} prunable layers, got {len(kept)}")
    kept = [torch.as_tensor(k, dtype=torch.long).sort().values for k in kept]
    for i, (k, layer) in enumerate(zip(kept, layers, strict=False)):
        width = layer.weight.shape[0]
        if len(k) == 0 or int(k.max()) >= width or len(torch.unique(k)) != len(k):
            raise ValueError(f"layer {i}: kept units must be distinct indices in [0, {width}) and not empty")
    inputs = layer_inputs(model, calibration_x) if calibration_x is not None else None
    new = build_network(model.spec.with_widths([len(k) for k in kept]))
    for j, (old, fresh) in enumerate(zip(layers, new.weight_layers(), strict=True)):
        w = old.weight.detach()
        if j > 0:
            group = _group(model, j - 1)
            if inputs is not None:
                problem = layer_problem(model, j - 1, inputs[j])
                w = least_squares_weights(problem, kept[j - 1]).to(w.dtype)
            elif isinstance(old, nn.Linear):
                w = w[:, columns_of(kept[j - 1], group)]
            else:
                w = w[:, kept[j - 1]]
        b = old.bias.detach()
        if j < len(kept):
            w, b = w[kept[j]], b[kept[j]]
        fresh.weight.copy_(w.reshape(fresh.weight.shape))
        fresh.bias.copy_(b)
    new.eval()
    return new


@torch.no_grad()
def shrink_layer(model: Classifier, i: int, kept: torch.Tensor, next_weight: torch.Tensor | None = None) -> Classifier:
    """A new network with only prunable layer `i` shrunk to units `kept`; the next layer gets `next_weight`
    (out x kept columns, e.g. least-squares weights) or the slice of its own columns. Used by the methods that
    prune layer by layer on the partially pruned network."""
    layers = model.weight_layers()
    kept = torch.as_tensor(kept, dtype=torch.long).sort().values
    widths = list(model.spec.widths)
    if len(kept) == 0 or int(kept.max()) >= widths[i] or len(torch.unique(kept)) != len(kept):
        raise ValueError(f"layer {i}: kept units must be distinct indices in [0, {widths[i]}) and not empty")
    group = _group(model, i)
    widths[i] = len(kept)
    new = build_network(model.spec.with_widths(widths))
    for j, (old, fresh) in enumerate(zip(layers, new.weight_layers(), strict=True)):
        w, b = old.weight.detach(), old.bias.detach()
        if j == i:
            w, b = w[kept], b[kept]
        elif j == i + 1:
            if next_weight is not None:
                w = next_weight.to(w.dtype)
            elif isinstance(old, nn.Linear):
                w = w[:, columns_of(kept, group)]
            else:
                w = w[:, kept]
        fresh.weight.copy_(w.reshape(fresh.weight.shape))
        fresh.bias.copy_(b)
    new.eval()
    return new
