"""Which queries are heavy, judged from the request body and the current snapshot before the query takes a slot:
the query limiter lets heavy queries hold all slots but `reserved_slots`, so a few worst-case queries cannot make
a cheap one wait behind them. The estimate is the stage plan's upper bound (every surviving cluster at `samples`
members, as the cost budget counts it), computed from plain JSON without building the target; anything it
cannot read counts as light (the route refuses it at once)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from cascade.config import Stage, scale_keeps
from service.state import ServiceState

__all__ = ["heavy_query", "estimated_flops", "announce_query"]


def estimated_flops(state: ServiceState, body: dict[str, Any]) -> int:
    """An upper bound on the FLOPs the query in `body` (or the queries of a multi-query body, together) may spend
    on the current snapshot (0: answered from the exact table or the embedding index alone, or not a query this
    estimate can read)."""
    snapshot = state.snapshot
    if isinstance(body.get("queries"), list):  # POST /v1/query/batch: the queries together
        return sum(estimated_flops(state, q) for q in body["queries"] if isinstance(q, dict))
    target = body.get("target")
    if snapshot is None or not isinstance(target, dict):
        return 0
    examples = target.get("examples")
    kind = "pair" if isinstance(examples, list) and snapshot.config.pair_dense is not None else "classifier"
    queries = len(examples) if isinstance(examples, list) and examples else 1
    k = body.get("k", 10)
    k = k if isinstance(k, int) and k > 0 else 10
    given = body.get("stages")
    mode = body.get("mode", "auto")
    if examples is None and given is None and mode != "cascade" and state.exact_table(snapshot) is not None:
        return 0  # the exact table answers it
    if given is not None:
        stages = tuple(Stage.model_validate(s) for s in given)
    else:
        stages = scale_keeps(snapshot.config.stages_for(kind), k, snapshot.config.reference_k)
    candidates = body.get("candidates")
    if examples is not None:
        alive = (
            candidates if isinstance(candidates, int) and candidates > 0 else max(k, state.settings.example_candidates)
        )
    else:
        alive = snapshot.space.num_clusters
    alive = min(alive, snapshot.space.num_clusters)
    widest = int(snapshot.space.sizes.max()) if snapshot.space.num_clusters else 0
    total = 0
    for i, stage in enumerate(stages):
        variant = snapshot.variants.get(stage.variant)
        if variant is None:
            return 0  # the route answers 422
        total += variant.cost(alive * min(stage.samples, widest)).nonzero * queries
        if i < len(stages) - 1 and stage.keep is not None:
            alive = min(alive, stage.keep)
    return total


def heavy_query(state: ServiceState) -> Callable[[bytes], bool]:
    """For the query limiter: whether a query body is heavy (over `heavy_query_flops`)."""
    threshold = state.settings.heavy_query_flops

    def heavy(body: bytes) -> bool:
        try:
            parsed = json.loads(body)
            return isinstance(parsed, dict) and estimated_flops(state, parsed) > threshold
        except Exception:  # a body the route will refuse: light, it leaves at once
            return False

    return heavy


def announce_query(state: ServiceState) -> Callable[[bytes], Any]:
    """For the query limiter: when a query by example that will run stages takes its slot, announce it to the
    batcher (`Batcher.expect`), so that a batch being formed waits for it; anything else announces nothing."""

    def announce(body: bytes) -> Any:
        batcher = state.batcher
        if batcher is None:
            return None
        try:
            parsed = json.loads(body)
        except Exception:  # a body the route will refuse
            return None
        target = parsed.get("target") if isinstance(parsed, dict) else None
        if not isinstance(target, dict) or target.get("examples") is None or parsed.get("stages") == []:
            return None
        return batcher.expect()

    return announce
