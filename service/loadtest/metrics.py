"""Per-point quality and latency numbers: percentiles, recall@k against the true labels, agreement@k with
the dense oracle. Pure functions, so the numbers in the CSV can be checked by hand."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["percentile", "recall_at_k", "agreement_at_k", "relevant_clusters"]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default);
    NaN for no values, so an all-errors point shows no latency rather than a made-up one."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(float(v) for v in values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def relevant_clusters(cluster_labels: np.ndarray, label: int) -> set[int]:
    """Clusters whose true (offline) label is the queried label."""
    return {int(c) for c in np.flatnonzero(np.asarray(cluster_labels) == label)}


def recall_at_k(returned: Iterable[int], relevant: set[int], k: int) -> float:
    """hits in the first k returned / min(k, |relevant|); NaN when nothing is relevant (undefined, not 0)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    top = list(dict.fromkeys(int(c) for c in returned))[:k]  # a duplicate id must not count twice
    denom = min(k, len(relevant))
    if denom == 0:
        return math.nan
    return sum(1 for c in top if c in relevant) / denom


def agreement_at_k(returned: Iterable[int], oracle: Sequence[int], k: int) -> float:
    """|top-k returned ∩ top-k of the dense oracle| / min(k, len(oracle top-k)): 1.0 means the cascade
    answers what the exhaustive dense model would."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    top = set(list(dict.fromkeys(int(c) for c in returned))[:k])
    ref = {int(c) for c in list(oracle)[:k]}
    if not ref:
        return math.nan
    return len(top & ref) / len(ref)
