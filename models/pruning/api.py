"""One entry point for every method: `prune(model, method, keep, ...)` returns a new network."""

from __future__ import annotations

import copy

import torch

from models.networks import Classifier
from models.pruning.budgets import BudgetRule, layer_budgets
from models.pruning.masks import Scope, apply_masks, select_masks
from models.pruning.registry import Calibration, get_method
from models.pruning.surgery import shrink

__all__ = ["prune"]


def prune(
    model: Classifier,
    method: str,
    keep: float,
    calibration: Calibration | None = None,
    *,
    scope: Scope = "global",
    reweight: bool = False,
    budget: BudgetRule = "uniform",
) -> Classifier:
    """Unstructured: `keep` is the fraction of weights kept (exactly). Structured: the fraction of units of
    every prunable layer under the `budget` rule (`uniform`, or `equal-error`). The input model is untouched."""
    spec = get_method(method)
    if spec.needs_data and calibration is None:
        raise ValueError(f"method {method!r} needs calibration data")
    if spec.needs_labels and (calibration is None or calibration.y is None):
        raise ValueError(f"method {method!r} needs labelled calibration data")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    pruned = copy.deepcopy(model).eval()
    if spec.kind == "unstructured":
        if reweight:
            raise ValueError("reweighting applies to structured methods only")
        if budget != "uniform":
            raise ValueError("budget rules apply to structured methods only")
        kwargs = {"keep": keep, "scope": scope} if spec.wants_keep else {}
        scores = spec.fn(pruned, calibration, **kwargs)
        masks = select_masks(scores, keep, scope)
        shifts = spec.compensate(pruned, calibration, masks) if spec.compensate is not None else {}
        apply_masks(pruned, masks)
        params = dict(pruned.named_parameters())
        with torch.no_grad():
            for name, shift in shifts.items():
                params[name].add_(shift.to(params[name].dtype))
        return pruned
    if reweight and calibration is None:
        raise ValueError("reweighting needs calibration data")
    budgets = layer_budgets(model, keep, budget, calibration.x if calibration is not None else None)
    if spec.builds_network:
        result = spec.fn(pruned, calibration, budgets, reweight=reweight)
        if not isinstance(result, Classifier):
            raise TypeError(f"method {method!r} declared builds_network but returned {type(result).__name__}")
        return result.eval()
    kept = spec.fn(pruned, calibration, budgets)
    return shrink(pruned, kept, calibration.x.float() if reweight and calibration is not None else None)
