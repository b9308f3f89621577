"""Shared-label tuple metrics: n-accuracy (is the argmax of a tuple's aggregated posterior its label?) and
relative information (how far the posterior moved from the prior towards certainty), with 95% intervals that
stay inside the values the metric can take (a normal approximation put n-accuracy at [0.9787, 1.0013])."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cascade.ranking_metrics import Z95, wilson_interval
from models.aggregation import entropy

__all__ = ["Estimate", "n_accuracy", "relative_information", "TupleMetrics"]


@dataclass(frozen=True)
class Estimate:
    """A mean with a 95% confidence interval [low, high]."""

    value: float
    low: float
    high: float


def _mean_ci(values: torch.Tensor, upper: float = math.inf) -> Estimate:
    """Normal-approximation interval of a mean, cut at `upper` when no single value can exceed it (the mean
    cannot either, so the cut loses no coverage)."""
    v = values.double()
    mean = float(v.mean())
    half = Z95 * float(v.std(unbiased=True)) / math.sqrt(len(v)) if len(v) > 1 else math.inf
    return Estimate(mean, mean - half, min(upper, mean + half))


def n_accuracy(log_posterior: torch.Tensor, labels: torch.Tensor) -> Estimate:
    """P(argmax of the aggregated posterior == y) over tuples, with its Wilson interval."""
    hits = int((log_posterior.argmax(1) == labels).sum())
    trials = len(labels)
    low, high = wilson_interval(hits, trials)
    return Estimate(hits / trials, low, high)


def relative_information(log_posterior: torch.Tensor, labels: torch.Tensor, prior: torch.Tensor) -> Estimate:
    """RI = (H(pi) - CE) / H(pi), CE in nats; 1 is certainty, 0 is the prior (project definition).

    Per tuple RI is at most 1 (CE >= 0) and unbounded below, so the interval is cut at 1 only."""
    h = entropy(prior)
    nll = -log_posterior.double().gather(1, labels.long()[:, None]).squeeze(1)
    return _mean_ci((h - nll) / h, upper=1.0)


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
