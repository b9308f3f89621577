"""A JSON-serialisable description of a classifier: enough to rebuild it before loading its weights."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

__all__ = ["NetworkKind", "NetworkSpec", "spec_int", "MAX_WIDTH", "MAX_INPUT_DIM", "MAX_CLASSES", "MAX_LAYERS"]

NetworkKind = Literal["mlp", "cnn1d", "cnn2d"]

# Sanity bounds on any spec (from a file, an upload or code): far above anything trained here, low enough that
# shapes and FLOPs stay exact 64-bit integers. The real memory limit is the service's parameter budget.
MAX_INPUT_DIM = 10_000_000
MAX_CLASSES = 100_000
MAX_WIDTH = 1_000_000
MAX_LAYERS = 64
MAX_KERNEL = 255


def spec_int(d: dict[str, Any], key: str, low: int, high: int, default: int | None = None) -> int:
    """`d[key]` as an int in [low, high]: a JSON integer (or an integral finite float), never a bool, a string,
    Infinity or NaN. Raises ValueError starting with the key, so the caller can name the field."""
    if key not in d:
        if default is None:
            raise ValueError(f"{key}: required")
        return default
    return _as_int(d[key], key, low, high)


def _as_int(value: Any, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key}: must be an integer, got {type(value).__name__}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ValueError(f"{key}: must be a finite integer, got {value!r}")
    if not low <= value <= high:
        shown = f"{value:.6g}" if isinstance(value, float) or abs(value) < 10**15 else "a larger number"
        raise ValueError(f"{key}: must be between {low} and {high}, got {shown}")
    return int(value)


def _int_list(d: dict[str, Any], key: str, required: bool) -> tuple[int, ...]:
    if key not in d and not required:
        return ()
    value = d.get(key)
    if not isinstance(value, list | tuple):
        raise ValueError(f"{key}: must be a list of integers")
    if len(value) > MAX_LAYERS:
        raise ValueError(f"{key}: at most {MAX_LAYERS} layers, got {len(value)}")
    return tuple(_as_int(w, f"{key}[{i}]", 1, MAX_WIDTH) for i, w in enumerate(value))


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
            raise ValueError(f"kind: unknown network kind {self.kind!r}")
        if not 0 < self.input_dim <= MAX_INPUT_DIM or not 2 <= self.num_classes <= MAX_CLASSES:
            raise ValueError(f"input_dim must be in [1, {MAX_INPUT_DIM}] and num_classes in [2, {MAX_CLASSES}]")
        if not self.hidden or min(self.hidden) <= 0:
            raise ValueError("at least one positive hidden width is required (it is the representation h)")
        if max(self.widths) > MAX_WIDTH or len(self.hidden) + len(self.channels) > MAX_LAYERS:
            raise ValueError(f"widths must be at most {MAX_WIDTH} and layers at most {MAX_LAYERS}")
        if self.kind == "mlp" and self.channels:
            raise ValueError("an MLP has no channels")
        if self.kind != "mlp":
            if not self.channels or min(self.channels) <= 0:
                raise ValueError("a CNN needs at least one positive channel count")
            if self.kernel_size % 2 != 1 or not 0 < self.kernel_size <= MAX_KERNEL:
                raise ValueError(f"kernel_size must be odd (same padding) and at most {MAX_KERNEL}")
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
        """Strict: every failure is a ValueError naming the key (never KeyError, OverflowError or a huge int)."""
        if not isinstance(d, dict):
            raise ValueError("spec: must be a JSON object")
        known = {"kind", "input_dim", "num_classes", "hidden", "channels", "kernel_size"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown spec keys: {sorted(str(k)[:40] for k in unknown)[:10]}")
        kind = d.get("kind")
        if kind not in ("mlp", "cnn1d", "cnn2d"):
            raise ValueError(f"kind: required, one of mlp, cnn1d, cnn2d; got {str(kind)[:40]!r}")
        return cls(
            kind=kind,
            input_dim=spec_int(d, "input_dim", 1, MAX_INPUT_DIM),
            num_classes=spec_int(d, "num_classes", 2, MAX_CLASSES),
            hidden=_int_list(d, "hidden", required=True),
            channels=_int_list(d, "channels", required=False),
            kernel_size=spec_int(d, "kernel_size", 1, MAX_KERNEL, default=5),
        )
