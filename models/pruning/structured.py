"""Structured selection, one pure function per method:
`select(model, calibration, budgets) -> [kept unit indices per prunable layer]`."""

from __future__ import annotations

import torch
from torch import nn

from models.networks import Classifier
from models.pruning.registry import Calibration, register_method
from models.pruning.surgery import columns_of

__all__ = ["outgoing_weight_norms", "top_units", "select_layer_weight_norm"]


def outgoing_weight_norms(model: Classifier) -> list[torch.Tensor]:
    """For every prunable layer, the norm of each unit's outgoing weights in the next layer."""
    layers = model.weight_layers()
    norms = []
    for i in range(len(layers) - 1):
        nxt = layers[i + 1].weight.detach()
        units = layers[i].weight.shape[0]
        if isinstance(layers[i + 1], nn.Linear):
            group = nxt.shape[1] // units
            per_col = nxt.pow(2).sum(0)
            norms.append(per_col[columns_of(torch.arange(units), group)].reshape(units, group).sum(1).sqrt())
        else:
            norms.append(nxt.transpose(0, 1).reshape(units, -1).norm(dim=1))
    return norms


def top_units(scores: list[torch.Tensor], budgets: list[int]) -> list[torch.Tensor]:
    """The `budget` highest-scoring units of every layer, sorted by index."""
    return [torch.topk(s, b).indices.sort().values for s, b in zip(scores, budgets, strict=True)]


@register_method("layer-weight-norm", kind="structured", needs_data=False)
def select_layer_weight_norm(
    model: Classifier, calibration: Calibration | None, budgets: list[int]
) -> list[torch.Tensor]:
    """Per layer, keep the units whose outgoing weights have the largest norm."""
    return top_units(outgoing_weight_norms(model), budgets)
