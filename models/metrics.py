"""Shared-label metrics (research notes section 1): n-accuracy and relative information, with intervals."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.aggregation import entropy

__all__ = ["Estimate", "n_accuracy", "relative_information"]


@dataclass(frozen=True)
class Estimate:
    """A mean with a 95% normal-approximation confidence interval."""

    value: float
    low: float
    high: float


def _mean_ci(values: torch.Tensor) -> Estimate:
    v = values.double()
    mean = float(v.mean())
    half = 1.96 * float(v.std(unbiased=True)) / math.sqrt(len(v)) if len(v) > 1 else math.inf
    return Estimate(mean, mean - half, mean + half)


def n_accuracy(log_posterior: torch.Tensor, labels: torch.Tensor) -> Estimate:
    """P(argmax of the aggregated posterior == y) over tuples."""
    return _mean_ci((log_posterior.argmax(1) == labels).double())


def relative_information(log_posterior: torch.Tensor, labels: torch.Tensor, prior: torch.Tensor) -> Estimate:
    """RI = (H(pi) - CE) / H(pi), CE in nats; 1 is certainty, 0 is the prior (project definition)."""
    h = entropy(prior)
    nll = -log_posterior.double().gather(1, labels.long()[:, None]).squeeze(1)
    return _mean_ci((h - nll) / h)
