"""Unstructured pruning: scores -> boolean masks (global or per-layer scope) -> zeroed weights."""

from __future__ import annotations

from typing import Literal

import torch

from models.networks import Classifier

__all__ = ["Scope", "prunable_weights", "select_masks", "apply_masks", "sparsity"]

Scope = Literal["global", "layer"]


def prunable_weights(model: Classifier) -> dict[str, torch.nn.Parameter]:
    """Every Linear/Conv weight, the head included, by its state-dict name."""
    layers = {id(m) for m in model.weight_layers()}
    return {f"{mod_name}.weight": mod.weight for mod_name, mod in model.named_modules() if id(mod) in layers}


def select_masks(scores: dict[str, torch.Tensor], keep: float, scope: Scope = "global") -> dict[str, torch.Tensor]:
    """Keep exactly round(keep * count) weights with the highest scores (ties broken by position)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if scope == "layer":
        return {name: _top_mask(s, keep) for name, s in scores.items()}
    if scope != "global":
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    flat = torch.cat([s.detach().reshape(-1).double() for s in scores.values()])
    mask = _top_mask(flat, keep)
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = mask[start : start + s.numel()].reshape(s.shape)
        start += s.numel()
    return out


def _top_mask(scores: torch.Tensor, keep: float) -> torch.Tensor:
    flat = scores.detach().reshape(-1).double()
    k = max(1, round(keep * flat.numel()))
    flat = torch.nan_to_num(flat, nan=-torch.inf)
    idx = torch.topk(flat, k, sorted=False).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[idx] = True
    return mask.reshape(scores.shape)


@torch.no_grad()
def apply_masks(model: Classifier, masks: dict[str, torch.Tensor]) -> Classifier:
    """Zero the pruned weights in place and attach a `weight_mask` buffer so fine-tuning keeps them zero."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        module = modules[name.rsplit(".", 1)[0]]
        m = mask.to(module.weight.dtype)
        module.weight.mul_(m)
        if "weight_mask" in module._buffers:
            module.weight_mask.copy_(m)
        else:
            module.register_buffer("weight_mask", m, persistent=False)
    return model


def sparsity(model: Classifier) -> float:
    """Fraction of prunable weights that are exactly zero."""
    ws = list(prunable_weights(model).values())
    total = sum(w.numel() for w in ws)
    zeros = sum(int((w == 0).sum()) for w in ws)
    return zeros / total
