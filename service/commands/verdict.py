"""One line that tells a user whether the model a command just stored is worth serving, against what exists:
a pruned model against the registered models of its kind pruned as much or more, a gadget against the
`mean_logit` aggregator it would replace. Pure functions of manifests and records, so they are checked alone."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.manifest import Manifest

__all__ = ["prune_verdict", "gadget_verdict", "SIMILAR_FLOPS"]

SIMILAR_FLOPS = 0.05
"""Models within 5% of the new one's nonzero FLOPs count as pruned as much."""


def prune_verdict(new: Manifest, registered: Iterable[Manifest]) -> str:
    """`new` against the active models of its kind, trained on the same data, measured on the same test split."""
    peers = [
        m
        for m in registered
        if m.name != new.name and m.model_kind == new.model_kind and m.dataset == new.dataset and m.accuracy > 0
    ]
    as_pruned = [m for m in peers if m.flops_nonzero <= new.flops_nonzero * (1 + SIMILAR_FLOPS)]
    better = [m for m in as_pruned if m.accuracy > new.accuracy]
    if better:
        best = max(better, key=lambda m: (m.accuracy, -m.flops_nonzero))
        return (
            f"verdict: worse than what exists: {best.ref}, at {_share(best, new)} of its nonzero FLOPs, has test "
            f"accuracy {best.accuracy:.3f} against {new.accuracy:.3f}; serve {best.name} instead"
        )
    if as_pruned:
        best = max(as_pruned, key=lambda m: m.accuracy)
        return (
            f"verdict: the most accurate of {len(as_pruned) + 1} models at its cost or less: test accuracy "
            f"{new.accuracy:.3f}, against {best.accuracy:.3f} for {best.ref} at {_share(best, new)} of its FLOPs"
        )
    if peers:
        cheapest = min(peers, key=lambda m: m.flops_nonzero)
        return (
            f"verdict: cheaper than every registered {new.model_kind}: test accuracy {new.accuracy:.3f} at "
            f"{_share(new, cheapest)} of the nonzero FLOPs of the cheapest, {cheapest.ref} ({cheapest.accuracy:.3f})"
        )
    return f"verdict: nothing of its kind to compare with; test accuracy {new.accuracy:.3f}"


def _share(a: Manifest, b: Manifest) -> str:
    """a's nonzero FLOPs as a share of b's."""
    return f"{a.flops_nonzero / b.flops_nonzero:.2f}x" if b.flops_nonzero else "n/a"


def gadget_verdict(variant: str, kind: str, record: Mapping[str, Any]) -> str:
    """The stored gadget against `mean_logit` on the same validation tuples (n-accuracy, n drawn from 1..n_max),
    with the noise of that many tuples: a difference within two standard errors is no clear difference."""
    acc = record["val_n_accuracy"]
    ours, mean = float(acc[kind]), float(acc["mean_logit"])
    n = int(record.get("tuples", {}).get("val", 0)) or 1
    noise = 2 * math.sqrt((ours * (1 - ours) + mean * (1 - mean)) / n)
    numbers = f"n-accuracy {ours:.3f} against {mean:.3f} for mean_logit on {n} validation tuples"
    if ours < mean - noise:
        return (
            f'verdict: worse than mean_logit ({numbers}): stages over {variant} are better served with "aggregator": '
            '"mean_logit"'
        )
    if ours > mean + noise:
        return f'verdict: better than mean_logit ({numbers}): a stage over {variant} may say "aggregator": "{kind}"'
    return (
        f"verdict: not better than mean_logit ({numbers}, within the noise of +-{noise:.3f}), which costs less: keep "
        '"aggregator": "mean_logit"'
    )
