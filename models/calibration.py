"""Posteriors that mean what they say: one temperature per model, fitted on held-out pairs, and the expected
calibration error (ECE) that says how far its confidences are from its accuracy.

Temperature scaling divides a model's logits by T > 0: the ranking of a member's grades does not change, only
how sure the posterior is. The negative log-likelihood of softmax(logits / T) is convex in 1 / T (the logits are
linear in it and log-sum-exp is convex), so a golden-section search over 1 / T finds the one minimum."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["fit_temperature", "expected_calibration_error", "calibration_report", "TEMPERATURES", "is_temperature"]

TEMPERATURES = (0.05, 20.0)
"""Temperatures searched and served; beyond them a model is broken, not miscalibrated."""


def is_temperature(value: object) -> bool:
    """A number a registry entry may carry as its temperature (a real number within `TEMPERATURES`)."""
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and TEMPERATURES[0] <= value <= TEMPERATURES[1]
    )


def _nll(logits: torch.Tensor, grades: torch.Tensor, inverse_t: float) -> float:
    return float(F.cross_entropy(logits * inverse_t, grades))


def fit_temperature(logits: torch.Tensor, grades: torch.Tensor, iterations: int = 60) -> float:
    """The T in [0.05, 20] that minimises the mean negative log-likelihood of `grades` (N,) under
    softmax(`logits` (N, G) / T)."""
    if logits.ndim != 2 or grades.shape != logits.shape[:1] or len(grades) == 0:
        raise ValueError("logits must be (N, G) and grades (N,) with N > 0")
    logits, grades = logits.detach().double(), grades.long()
    lo, hi = 1 / TEMPERATURES[1], 1 / TEMPERATURES[0]
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = _nll(logits, grades, a), _nll(logits, grades, b)
    for _ in range(iterations):
        if fa <= fb:  # the minimum lies left of b
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = _nll(logits, grades, a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = _nll(logits, grades, b)
    return 1 / ((lo + hi) / 2)


def expected_calibration_error(probs: torch.Tensor, grades: torch.Tensor, bins: int = 15) -> float:
    """Top-label ECE: predictions binned by their confidence (the largest probability) into `bins` equal-width
    bins; the mean over bins of |accuracy - mean confidence|, weighted by the bin's share of predictions."""
    if probs.ndim != 2 or grades.shape != probs.shape[:1] or len(grades) == 0:
        raise ValueError("probs must be (N, G) and grades (N,) with N > 0")
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == grades).double()
    which = torch.clamp((confidence.double() * bins).long(), max=bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            gap = (correct[inside].mean() - confidence[inside].double().mean()).abs()
            total += float(inside.double().mean() * gap)
    return total


def calibration_report(logits: torch.Tensor, grades: torch.Tensor, temperature: float) -> dict[str, float]:
    """What a registry entry keeps: the temperature, the ECE and NLL before and after it, and how many pairs."""
    logits = logits.detach().double()
    before, after = torch.softmax(logits, 1), torch.softmax(logits / temperature, 1)
    return {
        "temperature": round(temperature, 4),
        "ece_before": round(expected_calibration_error(before, grades), 4),
        "ece_after": round(expected_calibration_error(after, grades), 4),
        "nll_before": round(_nll(logits, grades.long(), 1.0), 4),
        "nll_after": round(_nll(logits, grades.long(), 1 / temperature), 4),
        "pairs": len(grades),
    }
