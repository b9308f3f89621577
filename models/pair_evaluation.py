"""Pair models on labelled pairs: the batch of (query view, item view, grade) pairs and the accuracy of a pair
model on it. Shared by training (validation), the bootstrap and the upload gate (the probe pairs of a space),
which must not import training code."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.pair import PairNetwork

__all__ = ["PairBatch", "pair_logits", "pair_accuracy"]


@dataclass(frozen=True)
class PairBatch:
    """P pairs: query views q (P, D), item views x (P, D), grades (P,) int64."""

    q: torch.Tensor
    x: torch.Tensor
    grade: torch.Tensor

    def __len__(self) -> int:
        return len(self.grade)


@torch.no_grad()
def pair_logits(model: PairNetwork, pairs: PairBatch, batch_size: int = 4096) -> torch.Tensor:
    model.eval()
    return torch.cat(
        [model(pairs.q[i : i + batch_size], pairs.x[i : i + batch_size]) for i in range(0, len(pairs), batch_size)]
    )


def pair_accuracy(model: PairNetwork, pairs: PairBatch) -> float:
    """Fraction of pairs whose argmax grade is the true grade."""
    return float((pair_logits(model, pairs).argmax(1) == pairs.grade).float().mean())
