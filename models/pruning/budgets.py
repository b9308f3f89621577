"""How many units each prunable layer keeps for a target kept fraction."""

from __future__ import annotations

__all__ = ["uniform_budgets"]


def uniform_budgets(widths: list[int], keep: float) -> list[int]:
    """The same fraction of every layer, at least one unit each."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    return [max(1, round(keep * w)) for w in widths]
