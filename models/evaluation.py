"""Model-level measurements: test accuracy and the relative output deviation from a reference network."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["predict_logits", "accuracy", "output_deviation"]


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    model.eval()
    xt = torch.as_tensor(x, dtype=torch.float32)
    return torch.cat([model(xt[i : i + batch_size]) for i in range(0, len(xt), batch_size)])


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    pred = predict_logits(model, x).argmax(1).numpy()
    return float((pred == np.asarray(y)).mean())


def output_deviation(model: nn.Module, reference: nn.Module, x: np.ndarray) -> tuple[float, float]:
    """Mean and 95th percentile of ||f(x) - f_pruned(x)|| / ||f(x)|| over probe items:
    how far pruning moved the outputs, whatever the labels say."""
    ref = predict_logits(reference, x)
    out = predict_logits(model, x)
    rel = (out - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-12)
    return float(rel.mean()), float(torch.quantile(rel, 0.95))
