"""Shared-label metrics (research notes section 1): n-accuracy and relative information, with intervals."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.aggregation import entropy

__all__ = ["Estimate", "n_accuracy", "relative_information", "TupleMetrics"]


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


class TupleMetrics:
    """Thin stateful layer over the functions above: `update` with batches of tuples, `compute` at the end."""

    def __init__(self, prior: torch.Tensor) -> None:
        self.prior = torch.as_tensor(prior, dtype=torch.float64)
        self._log_posteriors: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def update(self, log_posterior: torch.Tensor, labels: torch.Tensor) -> None:
        if log_posterior.shape[0] != labels.shape[0]:
            raise ValueError("one label per tuple is required")
        self._log_posteriors.append(log_posterior.detach())
        self._labels.append(labels.detach().long())

    def compute(self) -> dict[str, Estimate]:
        if not self._labels:
            raise ValueError("no tuples seen")
        lp, y = torch.cat(self._log_posteriors), torch.cat(self._labels)
        return {"n_accuracy": n_accuracy(lp, y), "relative_information": relative_information(lp, y, self.prior)}

    def reset(self) -> None:
        self._log_posteriors.clear()
        self._labels.clear()
