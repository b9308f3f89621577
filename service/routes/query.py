"""`POST /v1/query`: one cascade run on the snapshot current when the request started."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response

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
from service.dependencies import snapshot_of
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


# Kept cheap on purpose, since it is most of what HTTP adds to a small query: state and snapshot are read here
# rather than through two sub-dependencies, and the answer is serialised here, in the worker thread, and
# returned as JSON bytes; given a model, FastAPI would validate it a second time against `response_model` in
# another thread-pool hop before serialising it. `QueryResponse` is still built (so validated) once, and
# `response_model` still documents the route.
@router.post("/query", response_model=QueryResponse)
def query(request: QueryRequest, http: Request) -> Response:
    """Runs in FastAPI's thread pool: torch releases the GIL, so queries proceed in parallel. The snapshot is
    taken once, first: the whole query runs on it even if a swap happens meanwhile (503 until one is loaded).
    The cache key holds the snapshot id, so an answer is only ever reused on the snapshot that computed it."""
    state: ServiceState = http.app.state.service
    snapshot = snapshot_of(state)
    started = time.perf_counter()
    if request.k > state.settings.max_k:
        raise StageError("k", f"at most {state.settings.max_k}")
    cache = state.cache
    key = cache_key(request.model_dump(mode="json"), snapshot.id) if cache is not None else ""
    cached = cache.get(key) if cache is not None else None
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
    if cache is not None:
        cache.set(key, _to_json(response.model_copy(update={"cached": True})))
    return Response(content=_to_json(response), media_type="application/json")


def _to_json(response: QueryResponse) -> bytes:
    """The bytes FastAPI's own `response_model` path would send (pydantic's JSON, straight to bytes)."""
    return QueryResponse.__pydantic_serializer__.to_json(response)
