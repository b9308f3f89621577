"""`POST /v1/query`: one cascade run on the snapshot current when the request started."""

from __future__ import annotations

import time

from fastapi import APIRouter, Response

from cascade.engine import (
    Target,
    dense_flops,
    run_cascade,
    target_from_examples,
    target_from_label,
    target_from_utility,
)
from cascade.snapshot import Snapshot, StageError
from service.cache import cache_key
from service.dependencies import SnapshotDep, StateDep
from service.schemas import ClusterHit, QueryRequest, QueryResponse, StageOut
from service.state import ServiceState

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["query"])


def _target(snapshot: Snapshot, request: QueryRequest, state: ServiceState) -> Target:
    t = request.target
    if t.label is not None:
        return target_from_label(snapshot, t.label)
    if t.utility is not None:
        return target_from_utility(snapshot, t.utility)
    assert t.examples is not None
    if len(t.examples) > state.settings.max_examples:
        raise StageError("target.examples", f"at most {state.settings.max_examples} examples per query")
    candidates = request.candidates or max(request.k, state.settings.example_candidates)
    return target_from_examples(snapshot, t.examples, candidates)


@router.post("/query", response_model=QueryResponse)
def query(
    request: QueryRequest,
    snapshot: SnapshotDep,
    state: StateDep,
) -> QueryResponse | Response:
    """Runs in FastAPI's thread pool: torch releases the GIL, so queries proceed in parallel. The cache key
    holds the snapshot id, so an answer is only ever reused on the snapshot that computed it."""
    started = time.perf_counter()
    if request.k > state.settings.max_k:
        raise StageError("k", f"at most {state.settings.max_k}")
    key = cache_key(request.model_dump(mode="json"), snapshot.id)
    cached = state.cache.get(key) if state.cache is not None else None
    if cached is not None:
        return Response(content=cached, media_type="application/json", headers={"x-cache": "hit"})
    target = _target(snapshot, request, state)
    result = run_cascade(snapshot, target, request.k, request.stages, request.seed)
    response = QueryResponse(
        clusters=[
            ClusterHit(cluster_id=int(c), score=float(s), posterior=[float(p) for p in post])
            for c, s, post in zip(result.cluster_ids, result.scores, result.posteriors, strict=True)
        ],
        stages=[StageOut(**vars(s)) for s in result.stages],
        flops=result.flops,
        flops_dense_kernel=result.flops_dense_kernel,
        dense_flops=dense_flops(snapshot, target),
        target_flops=target.flops,
        latency_ms=(time.perf_counter() - started) * 1000.0,
        snapshot_id=result.snapshot_id,
    )
    metrics = state.metrics
    for stage in result.stages:
        metrics.stage_latency.labels(variant=stage.variant).observe(stage.ms / 1000.0)
        metrics.stage_flops.labels(variant=stage.variant).inc(stage.flops)
    metrics.query_flops.observe(result.flops)
    if state.cache is not None:
        state.cache.set(key, response.model_copy(update={"cached": True}).model_dump_json().encode())
    return response
