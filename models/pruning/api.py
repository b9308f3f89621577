"""One entry point for every method: `prune(model, method, keep, ...)` returns a new network."""

from __future__ import annotations

import copy

from models.networks import Classifier
from models.pruning.budgets import uniform_budgets
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
) -> Classifier:
    """Unstructured: `keep` is the fraction of weights kept (exactly). Structured: the fraction of units of
    every prunable layer (uniform budgets). The input model is left untouched."""
    spec = get_method(method)
    if spec.needs_data and calibration is None:
        raise ValueError(f"method {method!r} needs calibration data")
    if spec.needs_labels and (calibration is None or calibration.y is None):
        raise ValueError(f"method {method!r} needs labelled calibration data")
    pruned = copy.deepcopy(model).eval()
    if spec.kind == "unstructured":
        if reweight:
            raise ValueError("reweighting applies to structured methods only")
        scores = spec.fn(pruned, calibration)
        return apply_masks(pruned, select_masks(scores, keep, scope))
    if reweight and calibration is None:
        raise ValueError("reweighting needs calibration data")
    kept = spec.fn(pruned, calibration, uniform_budgets(model.spec.widths, keep))
    return shrink(pruned, kept, calibration.x if reweight and calibration is not None else None)
