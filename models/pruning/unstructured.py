"""Unstructured scores, one pure function per method: `score(model, calibration) -> {weight name: scores}`."""

from __future__ import annotations

import torch

from models.networks import Classifier
from models.pruning.masks import prunable_weights
from models.pruning.registry import Calibration, register_method

__all__ = ["score_magnitude"]


@register_method("magnitude", kind="unstructured", needs_data=False)
def score_magnitude(model: Classifier, calibration: Calibration | None = None) -> dict[str, torch.Tensor]:
    """|w|: the classic baseline; data-free."""
    return {name: w.detach().abs() for name, w in prunable_weights(model).items()}
