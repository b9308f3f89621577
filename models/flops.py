"""Exact per-item FLOPs (2 x multiply-adds of Linear, Conv and LSTM layers; biases and activations excluded,
the convention of `torch.utils.flop_counter`). Masked weights give two numbers: what a dense kernel does and
what a sparse kernel would do (nonzero weights only)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Flops", "count_flops", "lstm_flops", "linear_flops"]


@dataclass(frozen=True)
class Flops:
    dense_kernel: int
    nonzero: int

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.dense_kernel + other.dense_kernel, self.nonzero + other.nonzero)

    def __mul__(self, n: int) -> Flops:
        return Flops(self.dense_kernel * n, self.nonzero * n)


def linear_flops(in_features: int, out_features: int) -> int:
    return 2 * in_features * out_features


def lstm_flops(input_size: int, hidden_size: int, steps: int) -> int:
    """Four gates, each an input and a recurrent matmul, per step (gate nonlinearities excluded)."""
    return steps * 4 * (linear_flops(input_size, hidden_size) + linear_flops(hidden_size, hidden_size))


def _positions(output: torch.Tensor) -> int:
    """Output positions per item of a conv (length, or height x width)."""
    return int(output[0, 0].numel())


@torch.no_grad()
def count_flops(model: nn.Module, input_dim: int) -> Flops:
    """Runs one item through the model with hooks on every Linear/Conv/LSTM and sums their costs."""
    total = [0, 0]

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            w = module.weight
            rows = inputs[0].numel() // inputs[0].shape[-1]
            total[0] += 2 * w.numel() * rows
            total[1] += 2 * int(torch.count_nonzero(w)) * rows
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
            w = module.weight
            pos = _positions(output)
            total[0] += 2 * w.numel() * pos
            total[1] += 2 * int(torch.count_nonzero(w)) * pos
        elif isinstance(module, nn.LSTM):
            out = output[0]
            steps = out.shape[1] if module.batch_first else out.shape[0]
            dense = 0
            nonzero = 0
            for name, p in module.named_parameters():
                if name.startswith("weight_"):
                    dense += 2 * p.numel() * steps
                    nonzero += 2 * int(torch.count_nonzero(p)) * steps
            total[0] += dense
            total[1] += nonzero

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LSTM))
    ]
    was_training = model.training
    try:
        model.eval()
        model(torch.zeros(1, input_dim))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return Flops(dense_kernel=total[0], nonzero=total[1])
