"""Learned aggregation gadgets: they read the frozen network's hidden representations h_1..h_n of one tuple (n
members of one cluster, scored by one network) and output class logits for the label the members share.

- `lstm` (the paper's gadget): an LSTM reads h_1..h_n, a linear head maps its last state to logits.
- `deepsets`: mean of h_i, then a two-layer head (permutation invariant by construction).

Both are batched over many tuples of different sizes (contiguous member runs, as in `models.aggregation`).
Training (`models.gadget_training`) standardises h for conditioning and then folds the standardisation into the
first layer's weights, so a stored gadget is a plain LSTM/MLP and its FLOPs are exactly the hand count of
`GadgetSpec.flops`. This module is what serving loads: the networks, their spec, and the fit check.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from models.flops import linear_flops, lstm_flops

if TYPE_CHECKING:
    from models.pair import PairNetwork

__all__ = [
    "gadget_misfit",
    "GadgetKind",
    "GadgetSpec",
    "Gadget",
    "LSTMGadget",
    "DeepSetsGadget",
    "build_gadget",
    "pad_segments",
    "GADGET_KINDS",
]

GadgetKind = Literal["lstm", "deepsets"]
GADGET_KINDS: tuple[GadgetKind, ...] = ("lstm", "deepsets")
"""The aggregators that are trained gadgets (the others are closed-form, `models.aggregation`)."""


@dataclass(frozen=True)
class GadgetSpec:
    """Enough to rebuild a gadget before loading its weights (stored as JSON beside them)."""

    kind: GadgetKind
    input_dim: int
    num_classes: int
    hidden_size: int = 32

    def __post_init__(self) -> None:
        if self.kind not in GADGET_KINDS:
            raise ValueError(f"unknown gadget kind {self.kind!r}")
        if min(self.input_dim, self.hidden_size) < 1 or self.num_classes < 2:
            raise ValueError("input_dim and hidden_size must be positive and num_classes at least 2")

    def flops(self, n: int) -> int:
        """FLOPs of aggregating one tuple of n members (2 x multiply-adds; activations and biases excluded)."""
        if n < 1:
            raise ValueError("n must be at least 1")
        if self.kind == "lstm":
            return lstm_flops(self.input_dim, self.hidden_size, n) + linear_flops(self.hidden_size, self.num_classes)
        # deepsets: n * H accumulates for the mean (as the averaging aggregators count theirs), then the head
        return (
            n * self.input_dim
            + linear_flops(self.input_dim, self.hidden_size)
            + linear_flops(self.hidden_size, self.num_classes)
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GadgetSpec:
        unknown = set(d) - {"kind", "input_dim", "num_classes", "hidden_size"}
        if unknown:
            raise ValueError(f"unknown gadget spec keys: {sorted(unknown)}")
        return cls(d["kind"], int(d["input_dim"]), int(d["num_classes"]), int(d["hidden_size"]))


def pad_segments(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(M x H) member rows in contiguous runs -> (T x max(counts) x H), zero padded."""
    counts = counts.long()
    seg = torch.repeat_interleave(torch.arange(len(counts)), counts)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(len(values)) - starts[seg]
    out = values.new_zeros(len(counts), int(counts.max()), values.shape[1])
    out[seg, pos] = values
    return out


class Gadget(nn.Module):
    """Common interface: `forward(hidden, counts) -> logits` (T x C), one row per tuple."""

    spec: GadgetSpec

    def __init__(self, spec: GadgetSpec) -> None:
        super().__init__()
        self.spec = spec
        # Standardisation of h used during training; identity once folded (see `fold_standardisation`).
        self.register_buffer("shift", torch.zeros(spec.input_dim), persistent=False)
        self.register_buffer("scale", torch.ones(spec.input_dim), persistent=False)

    def flops(self, n: int) -> int:
        return self.spec.flops(n)

    def set_standardisation(self, shift: torch.Tensor, scale: torch.Tensor) -> None:
        self.shift.copy_(shift)
        self.scale.copy_(scale)

    def _standardise(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden.float() - self.shift) / self.scale

    def fold_standardisation(self) -> None:
        """Rewrite W((h - m)/s) + b as (W/s) h + (b - W m/s) in the first layer, then reset to identity."""
        raise NotImplementedError


class LSTMGadget(Gadget):
    def __init__(self, spec: GadgetSpec) -> None:
        super().__init__(spec)
        self.lstm = nn.LSTM(spec.input_dim, spec.hidden_size, batch_first=True)
        self.head = nn.Linear(spec.hidden_size, spec.num_classes)

    def forward(self, hidden: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        padded = pad_segments(self._standardise(hidden), counts)
        packed = pack_padded_sequence(padded, counts.long().cpu(), batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)
        return self.head(h_n[-1])

    @torch.no_grad()
    def fold_standardisation(self) -> None:
        w = self.lstm.weight_ih_l0
        self.lstm.bias_ih_l0 -= (w / self.scale) @ self.shift
        w /= self.scale
        self.set_standardisation(torch.zeros_like(self.shift), torch.ones_like(self.scale))


class DeepSetsGadget(Gadget):
    def __init__(self, spec: GadgetSpec) -> None:
        super().__init__(spec)
        self.head = nn.Sequential(
            nn.Linear(spec.input_dim, spec.hidden_size), nn.ReLU(), nn.Linear(spec.hidden_size, spec.num_classes)
        )

    def forward(self, hidden: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        counts = counts.long()
        seg = torch.repeat_interleave(torch.arange(len(counts)), counts)
        h = self._standardise(hidden)
        mean = h.new_zeros(len(counts), h.shape[1]).index_add_(0, seg, h) / counts[:, None]
        return self.head(mean)

    @torch.no_grad()
    def fold_standardisation(self) -> None:
        first = self.head[0]
        first.bias -= (first.weight / self.scale) @ self.shift
        first.weight /= self.scale
        self.set_standardisation(torch.zeros_like(self.shift), torch.ones_like(self.scale))


def build_gadget(spec: GadgetSpec) -> Gadget:
    return LSTMGadget(spec) if spec.kind == "lstm" else DeepSetsGadget(spec)


def gadget_misfit(gadget: nn.Module, model: PairNetwork) -> str | None:
    """Why `gadget` cannot aggregate this pair model's members (None when it can): it must read the scorer's
    hidden width and output one logit per relevance grade."""
    spec = getattr(gadget, "spec", None)
    if not isinstance(spec, GadgetSpec):
        return "not a models.gadget gadget"
    hidden = model.spec.scorer.hidden[-1] if model.spec.scorer.hidden else model.spec.interaction_dim
    if spec.num_classes != model.spec.num_grades:
        return f"the gadget outputs {spec.num_classes} classes; the pair model has {model.spec.num_grades} grades"
    if spec.input_dim != hidden:
        return f"the gadget reads {spec.input_dim}-dim hidden states; the pair model's are {hidden}-dim"
    return None
