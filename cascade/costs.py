"""What a query costs, in FLOPs, counted one way: a stage (its model on the members it scores, the aggregation
of its clusters), a plan's stages before they run (the same count, from the stage list), and the dense
exhaustive oracle (the yardstick of every answer). The stage loop counts what it ran with `stage_flops`; a plan
(`cascade.plan`) predicts it with `planned_stage_flops`."""

from __future__ import annotations

from collections.abc import Mapping

from cascade.config import Stage
from cascade.errors import RequestError
from cascade.snapshot import Snapshot, Variant
from cascade.target import Target
from models.aggregation import get_aggregator

__all__ = ["stage_flops", "planned_stage_flops", "dense_flops"]


def stage_flops(
    variant: Variant,
    aggregator: str,
    items: int,
    members: Mapping[int, int],
    num_outputs: int,
    examples: int = 1,
    prepared_for: int | None = None,
) -> tuple[int, int]:
    """(nonzero, dense-kernel) FLOPs of one stage, for every example: the model on `items` members (the query
    prepared before for `prepared_for` items and reused, or not), and the aggregation of clusters that have
    `members` = {members per cluster: clusters}."""
    agg = get_aggregator(aggregator)
    aggregation = sum(clusters * agg.flops(n, num_outputs, variant.gadget) for n, clusters in members.items())
    cost = variant.cost(items, prepared_for=prepared_for)
    return examples * cost.nonzero + examples * aggregation, examples * cost.dense_kernel + examples * aggregation


def planned_stage_flops(snapshot: Snapshot, target: Target, k: int, stages: tuple[Stage, ...]) -> tuple[int, ...]:
    """Each stage's nonzero FLOPs as the stage loop (`cascade.stage_loop`) will count them (`stage_flops`),
    before anything runs: every surviving cluster is assumed to have at least `samples` members, so the figure
    is exact where they do and an upper bound otherwise. A stage of the same variant as the one before extends
    its members, as the loop does."""
    alive = len(target.candidates) if target.candidates is not None else snapshot.space.num_clusters
    max_size = int(snapshot.space.sizes.max()) if snapshot.space.num_clusters else 0
    costs = []
    previous: tuple[str, int, int] | None = None  # (variant, members per cluster, items prepared for)
    for i, stage in enumerate(stages):
        variant = snapshot.variants[stage.variant]
        n = min(stage.samples, max_size)
        if previous is not None and previous[0] == stage.variant:  # extends the members the stage before scored
            items, prepared_for = alive * max(n - previous[1], 0), previous[2]
            previous = (stage.variant, max(n, previous[1]), previous[2])
        else:
            items, prepared_for = alive * n, None
            previous = (stage.variant, n, alive * n)
        members = {previous[1]: alive} if alive and previous[1] else {}
        nonzero, _ = stage_flops(
            variant, stage.aggregator, items, members, len(variant.log_prior), len(target.queries), prepared_for
        )
        costs.append(nonzero)
        alive = k if i == len(stages) - 1 else min(stage.keep or k, alive)
    return tuple(costs)


def dense_flops(snapshot: Snapshot, target: Target) -> int:
    """What the dense exhaustive oracle costs for this target: the dense model on every member of every
    cluster (for every example of a query by example), as the snapshot counted it once (`Snapshot.oracle_flops`)."""
    per_example = snapshot.oracle_flops.get(target.kind)
    if per_example is None:
        raise RequestError("target", f"no dense {target.kind} model is configured")
    return per_example * len(target.queries)
