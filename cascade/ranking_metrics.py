"""Retrieval metrics, once: recall@k, hit@k, nDCG@k with graded gains, agreement@k, percentiles, means over
queries and Wilson intervals. Pure functions of one query's ranking (the engine's evaluation, the load tester,
the tuner and every benchmark call these), checked against trec_eval through `ir-measures` in the tests.

The one rule for duplicates and missing values:

- A ranking is a sequence of item ids, best first. An id counts at its first place only: later repeats are
  dropped before the ranking is cut at k (a cascade that returns one cluster twice gains nothing from it).
  A ranking shorter than k is not padded: its missing places count as not relevant (as trec_eval does).
- A metric a query cannot define is NaN, never 0: recall@k and hit@k with nothing relevant, nDCG@k with no
  positive gain, agreement@k with an empty reference, the percentile of no values. Means over queries and
  percentiles skip NaN entries (a query with nothing to find says nothing about the ranking); a mean or
  percentile of no defined value is NaN.

The definitions, in trec_eval's terms (so that our numbers mean what the field's mean):

- recall@k = relevant among the first k / min(k, R), R the number of relevant items: P@k when R >= k, R@k
  (trec_eval's `recall_k`) when R < k; 1.0 means the ranking is as good as k places allow.
- hit@k = 1 if anything relevant is among the first k, else 0 (`Success@k`).
- nDCG@k = sum_i gain(item_i) / log2(i + 1) over the first k places, divided by the same sum over the items
  sorted by gain (the ideal ranking of every item, not only of those ranked); gains are the linear relevance
  grades as given (`ndcg_cut_k`). Binary relevance is gains in {0, 1}.
- agreement@k = |first k of the ranking ∩ first k of a reference ranking| / |first k of the reference|: recall
  against the reference's top k (P@k with the reference's top k as the relevant set when it has k items).

And the choice among configurations measured this way, once: the Pareto front of cost against quality; the sweet
spot, the cheapest front point within a tolerance of the best quality (the load tester's); and the best quality a
cost budget buys (the tuple experiments'). A point with a NaN cost or quality is never chosen.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "distinct_top_k",
    "recall_at_k",
    "hit_at_k",
    "ndcg_at_k",
    "agreement_at_k",
    "relevant_items",
    "percentile",
    "median",
    "mean_over_queries",
    "wilson_interval",
    "Z95",
    "pareto_front",
    "sweet_spot",
    "best_within_budget",
]

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def distinct_top_k(ranking: Iterable[int], k: int) -> list[int]:
    """The first k distinct ids of a ranking, each at its first place (the rule every metric here applies)."""
    _check_k(k)
    top: dict[int, None] = {}
    for item in ranking:
        top.setdefault(int(item), None)
        if len(top) == k:
            break
    return list(top)


def recall_at_k(ranking: Iterable[int], relevant: Collection[int], k: int) -> float:
    """Relevant ids among the first k distinct ones / min(k, |relevant|); NaN when nothing is relevant."""
    top = distinct_top_k(ranking, k)
    denom = min(k, len(relevant))
    if denom == 0:
        return math.nan
    return sum(1 for c in top if c in relevant) / denom


def hit_at_k(ranking: Iterable[int], relevant: Collection[int], k: int) -> float:
    """1.0 when any relevant id is among the first k, else 0.0; NaN when nothing is relevant."""
    top = distinct_top_k(ranking, k)
    if not relevant:
        return math.nan
    return float(any(c in relevant for c in top))


def ndcg_at_k(ranking: Iterable[int], gains: np.ndarray | Sequence[float], k: int) -> float:
    """Graded nDCG@k with linear gains: `gains[i]` is item i's gain (every item of the collection, so that the
    ideal ranking is the best of all of them); NaN when no item has a positive gain. Gains must be >= 0."""
    top = distinct_top_k(ranking, k)
    g = np.asarray(gains, dtype=np.float64)
    if g.ndim != 1:
        raise ValueError("gains must be one value per item")
    if len(g) and float(g.min()) < 0:
        raise ValueError("gains must be non-negative")
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = float((g[np.asarray(top, dtype=np.int64)] * discounts[: len(top)]).sum()) if top else 0.0
    best = np.sort(g)[::-1][:k]
    ideal = float((best * discounts[: len(best)]).sum())
    return dcg / ideal if ideal > 0 else math.nan


def agreement_at_k(ranking: Iterable[int], reference: Iterable[int], k: int) -> float:
    """|first k of `ranking` ∩ first k of `reference`| / |first k of `reference`|: 1.0 means the ranking
    answers what the reference (the dense oracle) would; NaN for an empty reference."""
    ref = distinct_top_k(reference, k)
    if not ref:
        return math.nan
    return len(set(distinct_top_k(ranking, k)) & set(ref)) / len(ref)


def relevant_items(item_labels: np.ndarray, label: int) -> set[int]:
    """The ids of the items (clusters) whose true label is `label`: the relevant set of a label query."""
    return {int(c) for c in np.flatnonzero(np.asarray(item_labels) == label)}


def _defined(values: Iterable[float]) -> np.ndarray:
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    return v[~np.isnan(v)]


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100) of the defined values, linear interpolation between order statistics
    (numpy's default); NaN when there is none, so an all-errors point shows no latency rather than a made-up one."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(_defined(values).tolist())
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Iterable[float]) -> float:
    """`percentile(values, 50)`: the median of the defined values, NaN when there is none."""
    return percentile(values, 50.0)


def mean_over_queries(values: Iterable[float]) -> float:
    """Mean of the defined per-query values (NaN ones are queries the metric cannot judge); NaN when none is."""
    v = _defined(values)
    return float(v.mean()) if len(v) else math.nan


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion: inside [0, 1] by construction and not degenerate at 0 or n
    successes, where the normal approximation gives a zero-width interval or one that crosses 0 or 1."""
    if trials < 1:
        raise ValueError(f"a proportion needs at least one trial, got {trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, {trials}], got {successes}")
    p = successes / trials
    z2 = z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z / (1 + z2 / trials) * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    # exact ends at 0 and n successes (where the formula gives them up to rounding), and the estimate inside
    low = 0.0 if successes == 0 else max(0.0, min(p, centre - half))
    high = 1.0 if successes == trials else min(1.0, max(p, centre + half))
    return low, high


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


def _undefined(quality: Any) -> bool:
    first = quality[0] if isinstance(quality, tuple) else quality
    return isinstance(first, float) and math.isnan(first)


def best_within_budget(costs: Sequence[float], qualities: Sequence[Any], budget: float) -> int | None:
    """The index of the best quality among the points costing at most `budget` (qualities compare as given:
    a tuple such as (n-accuracy, RI) breaks ties by its later entries); the first such point on a tie; None when
    nothing is affordable."""
    if len(costs) != len(qualities):
        raise ValueError("costs and qualities must have the same length")
    ok = [i for i in range(len(costs)) if costs[i] <= budget and not _undefined(qualities[i])]
    return max(ok, key=lambda i: qualities[i]) if ok else None
