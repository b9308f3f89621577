"""A JSON-serialisable description of a classifier: enough to rebuild it before loading its weights."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

__all__ = ["NetworkKind", "NetworkSpec"]

NetworkKind = Literal["mlp", "cnn1d", "cnn2d"]


@dataclass(frozen=True)
class NetworkSpec:
    """Widths are explicit so that a structurally pruned network is just a spec with smaller numbers.

    Every network takes flat feature vectors of length `input_dim`; CNNs reshape them to
    `(1, input_dim)` (1-D) or `(1, side, side)` (2-D) themselves, so the space stores one layout.
    """

    kind: NetworkKind
    input_dim: int
    num_classes: int
    hidden: tuple[int, ...]
    channels: tuple[int, ...] = ()
    kernel_size: int = 5

    def __post_init__(self) -> None:
        if self.kind not in ("mlp", "cnn1d", "cnn2d"):
            raise ValueError(f"unknown network kind {self.kind!r}")
        if self.input_dim <= 0 or self.num_classes < 2:
            raise ValueError("input_dim must be positive and num_classes at least 2")
        if not self.hidden or min(self.hidden) <= 0:
            raise ValueError("at least one positive hidden width is required (it is the representation h)")
        if self.kind == "mlp" and self.channels:
            raise ValueError("an MLP has no channels")
        if self.kind != "mlp":
            if not self.channels or min(self.channels) <= 0:
                raise ValueError("a CNN needs at least one positive channel count")
            if self.kernel_size % 2 != 1:
                raise ValueError("kernel_size must be odd (same padding)")
            self.conv_output_size()  # raises when the input is too small for the pools

    @property
    def hidden_dim(self) -> int:
        return self.hidden[-1]

    @property
    def image_side(self) -> int:
        side = math.isqrt(self.input_dim)
        if side * side != self.input_dim:
            raise ValueError(f"cnn2d needs a square input, got input_dim={self.input_dim}")
        return side

    def conv_output_size(self) -> int:
        """Spatial positions per channel after the last conv block (each block halves every side)."""
        size = self.input_dim if self.kind == "cnn1d" else self.image_side
        for _ in self.channels:
            size //= 2
        if size < 1:
            raise ValueError("input too small for that many conv blocks")
        return size if self.kind == "cnn1d" else size * size

    def with_widths(self, widths: list[int]) -> NetworkSpec:
        """The same architecture with new unit counts for the prunable layers (channels, then hidden)."""
        n_conv = len(self.channels)
        if len(widths) != n_conv + len(self.hidden):
            raise ValueError("one width per prunable layer is required")
        return replace(self, channels=tuple(widths[:n_conv]), hidden=tuple(widths[n_conv:]))

    @property
    def widths(self) -> list[int]:
        return [*self.channels, *self.hidden]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"], d["channels"] = list(self.hidden), list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetworkSpec:
        known = {"kind", "input_dim", "num_classes", "hidden", "channels", "kernel_size"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown spec keys: {sorted(unknown)}")
        return cls(
            kind=d["kind"],
            input_dim=int(d["input_dim"]),
            num_classes=int(d["num_classes"]),
            hidden=tuple(int(w) for w in d["hidden"]),
            channels=tuple(int(c) for c in d.get("channels", ())),
            kernel_size=int(d.get("kernel_size", 5)),
        )
