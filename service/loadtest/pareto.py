"""Which configurations are worth running: the Pareto front of cost (FLOPs) against quality (recall), and
the sweet spot, the cheapest configuration whose quality is within a tolerance of the best."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["pareto_front", "sweet_spot"]


def pareto_front(costs: Sequence[float], qualities: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points (lower cost and higher quality are better), sorted by cost.

    A point is dominated when another is no worse on both axes and strictly better on one. Points with a
    NaN coordinate are never on the front; exact duplicates are both kept."""
    if len(costs) != len(qualities):
        raise ValueError("costs and qualities must have the same length")
    ok = [i for i in range(len(costs)) if not (math.isnan(costs[i]) or math.isnan(qualities[i]))]
    front = []
    for i in ok:
        dominated = any(
            costs[j] <= costs[i]
            and qualities[j] >= qualities[i]
            and (costs[j] < costs[i] or qualities[j] > qualities[i])
            for j in ok
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (costs[i], -qualities[i], i))


def sweet_spot(costs: Sequence[float], qualities: Sequence[float], tolerance: float = 0.01) -> int | None:
    """The cheapest front point with quality >= best - tolerance (absolute); None when no point is valid.

    Tolerance is absolute (0.01 = one recall point) because recall is already a fraction in [0, 1]."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    front = pareto_front(costs, qualities)
    if not front:
        return None
    best = max(qualities[i] for i in front)
    return next(i for i in front if qualities[i] >= best - tolerance)
