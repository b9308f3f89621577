"""`POST /v1/query`: one answer on the snapshot current when the request started, from the exact table (label and
utility targets, once built), the cascade, or the embedding index alone."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Body, HTTPException, Request, Response

from cascade.engine import (
    CascadeResult,
    DeadlineExceeded,
    Target,
    dense_flops,
    plan_flops,
    run_cascade,
    target_from_examples,
    target_from_label,
    target_from_utility,
)
from cascade.snapshot import Snapshot, StageError
from cascade.tuning_record import QualityUnmet, plan_for_quality
from service.cache import cache_key
from service.dependencies import snapshot_of
from service.errors import error_responses
from service.schemas import ClusterHit, QueryRequest, QueryResponse, StageOut
from service.state import ServiceState

__all__ = ["router", "QUERY_EXAMPLES"]

router = APIRouter(prefix="/v1", tags=["query"])

QUERY_EXAMPLES: dict[str, dict[str, Any]] = {
    "label": {
        "summary": "Clusters of one label",
        "description": "Answered exactly from the dense cluster posteriors once they are built.",
        "value": {"target": {"label": 3}, "k": 5},
    },
    "utility": {
        "summary": "A utility over classes",
        "value": {"target": {"utility": [0, 0, 1, 0.5, 0, 0, 0, 0, 0, 0]}, "k": 5},
    },
    "examples": {
        "summary": "Query by example (the cascade of pair models)",
        "description": "Take a query object from GET /v1/space/queries. Pair models read it with every sampled "
        "member; the answer ranks clusters by gains x grade posterior.",
        "value": {"target": {"examples": [[0.0] * 40]}, "k": 10},
    },
    "stages": {
        "summary": "A query by example with its own cascade",
        "value": {
            "target": {"examples": [[0.0] * 40]},
            "k": 10,
            "candidates": 200,
            "stages": [
                {"variant": "pair-s10", "samples": 1, "keep": 60, "aggregator": "bayes"},
                {"variant": "pair-dense", "samples": 3, "keep": 20},
                {"variant": "pair-dense", "samples": 10},
            ],
            "seed": 1,
        },
    },
}


def _outputs(snapshot: Snapshot, target: Target) -> list[str]:
    if target.kind == "pair":
        names = ["other", "same_label", "same_cluster"]
        return (
            names[: snapshot.num_grades]
            if snapshot.num_grades <= 3
            else [f"grade_{g}" for g in range(snapshot.num_grades)]
        )
    return [str(c) for c in range(snapshot.space.num_classes)]


def _target(snapshot: Snapshot, request: QueryRequest, state: ServiceState) -> Target:
    t = request.target
    if t.gains is not None and t.examples is None:
        raise StageError("target.gains", "gains weigh relevance grades of a query by example; use examples")
    if request.candidates is not None and t.examples is None:
        raise StageError("candidates", "candidates (stage 0's M) apply to a query by example only")
    if t.label is not None:
        return target_from_label(snapshot, t.label)
    if t.utility is not None:
        return target_from_utility(snapshot, t.utility)
    assert t.examples is not None
    if len(t.examples) > state.settings.max_examples:
        raise StageError("target.examples", f"at most {state.settings.max_examples} examples per query")
    candidates = request.candidates or max(
        request.k, snapshot.config.pair_candidates or state.settings.example_candidates
    )
    return target_from_examples(snapshot, t.examples, candidates, t.gains)


def _plan_for_quality(snapshot: Snapshot, request: QueryRequest) -> QueryRequest:
    """A request that names a quality: the stages and M of the cheapest plan on the tuned front that meets it."""
    if request.stages is not None or request.candidates is not None:
        raise StageError("quality", "give a quality or stages and candidates, not both")
    if request.target.examples is None:
        raise StageError("quality", "a quality picks a plan of the pair cascade: it needs a query by example")
    try:
        point = plan_for_quality(snapshot.config.pair_tuning, request.quality or 0.0)
    except QualityUnmet as exc:
        raise StageError("quality", str(exc)) from None
    return request.model_copy(update={"stages": list(point.stages), "candidates": point.candidates, "quality": None})


def _exact_table(state: ServiceState, snapshot: Snapshot, request: QueryRequest, target: Target) -> Any:
    """The exact table answers a classifier target unless the request asks for the cascade; None: cascade."""
    if request.mode == "exact" and request.stages is not None:
        raise StageError("mode", "an exact answer runs no stages; drop stages or use mode cascade")
    if request.mode == "exact" and target.kind != "classifier":
        raise StageError("mode", "a query by example is read by the pair models with every item: no exact table")
    if target.kind != "classifier" or request.mode == "cascade" or request.stages is not None:
        return None
    table = state.exact_table(snapshot)
    if table is None and request.mode == "exact":
        raise HTTPException(503, "the exact table for this dense model is still being built", {"Retry-After": "5"})
    return table


def _check_budget(state: ServiceState, snapshot: Snapshot, request: QueryRequest, target: Target) -> None:
    budget = state.settings.max_query_flops
    cost = plan_flops(snapshot, target, request.k, request.stages)
    if cost > budget:
        field = "stages" if request.stages is not None else "k"
        raise StageError(
            field, f"this query may cost {cost:,} FLOPs, over the server's budget of {budget:,} (max_query_flops)"
        )


# Kept cheap on purpose, since it is most of what HTTP adds to a small query: state and snapshot are read here
# rather than through two sub-dependencies, and the answer is serialised here, in the worker thread, and
# returned as JSON bytes; given a model, FastAPI would validate it a second time against `response_model` in
# another thread-pool hop before serialising it. `QueryResponse` is still built (so validated) once, and
# `response_model` still documents the route.
@router.post(
    "/query",
    response_model=QueryResponse,
    summary="Find the clusters that best match a target",
    responses=error_responses(408, 413, 422, 503, 504),
)
def query(http: Request, request: QueryRequest = Body(openapi_examples=QUERY_EXAMPLES)) -> Response:  # noqa: B008
    """Returns the `k` best clusters for a label, a utility over classes, or example items, with the posterior
    and the value each was ranked by, and what the answer cost (FLOPs per stage, against `dense_flops`: the
    dense model on every item). Label and utility targets are answered exactly from the dense model's cluster
    posteriors once they are built; queries by example run the cascade of pair models (`stages` overrides it,
    `[]` answers from the embedding index alone). Same request, same snapshot, same answer (`seed`)."""
    state: ServiceState = http.app.state.service
    snapshot = snapshot_of(state)
    started = time.perf_counter()
    if request.quality is not None:
        request = _plan_for_quality(snapshot, request)
    if request.k > state.settings.max_k:
        raise StageError("k", f"at most {state.settings.max_k}")
    target = _target(snapshot, request, state)
    table = _exact_table(state, snapshot, request, target)
    cache = state.cache
    key = ""
    if cache is not None:
        canonical = request.model_dump(mode="json")
        if table is not None:  # exact answers take no seed: equal queries share one entry
            canonical = {"target": canonical["target"], "k": request.k, "path": "exact"}
        key = cache_key(canonical, snapshot.id)
        cached = cache.get(key)
        if cached is not None:
            body = json.loads(cached)
            body["latency_ms"] = (time.perf_counter() - started) * 1000.0
            return Response(content=json.dumps(body), media_type="application/json", headers={"x-cache": "hit"})
    if table is not None:
        result, mode = table.answer(target, request.k, snapshot.id), "exact"
    else:
        _check_budget(state, snapshot, request, target)
        deadline = getattr(http.state, "deadline", None)
        try:
            result = run_cascade(snapshot, target, request.k, request.stages, request.seed, deadline)
        except DeadlineExceeded as exc:  # the limiter has answered 504 already; this frees the worker
            raise HTTPException(504, str(exc)) from None
        mode = "cascade" if result.stages else "faiss"
    response = _response(snapshot, target, result, mode, started)
    metrics = state.metrics
    for stage in result.stages:
        metrics.stage_latency.labels(variant=stage.variant).observe(stage.ms / 1000.0)
        metrics.stage_flops.labels(variant=stage.variant).inc(stage.flops)
    metrics.query_flops.observe(result.flops)
    if cache is not None:
        cache.set(key, _to_json(response.model_copy(update={"cached": True})))
    return Response(content=_to_json(response), media_type="application/json")


def _response(snapshot: Snapshot, target: Target, result: CascadeResult, mode: str, started: float) -> QueryResponse:
    """The answer in the user's terms: cluster ids are the space's own (`Space.cluster_ids`), outputs of a
    classifier are the user's labels."""
    values = result.ranking_values if result.ranking_values is not None else result.scores
    space = snapshot.space
    user_ids = space.cluster_ids[np.asarray(result.cluster_ids, dtype=np.int64)]  # type: ignore[index]
    outputs = _outputs(snapshot, target) if result.posteriors.shape[1] else []
    if target.kind == "classifier" and outputs:
        outputs = [str(label) for label in space.labels_known]
    return QueryResponse(
        mode=mode,  # type: ignore[arg-type]
        ranking=result.ranking,
        outputs=outputs,
        clusters=[
            ClusterHit(cluster_id=int(c), score=float(s), ranking_value=float(v), posterior=[float(p) for p in post])
            for c, s, v, post in zip(user_ids, result.scores, values, result.posteriors, strict=True)
        ],
        stages=[StageOut(**vars(s)) for s in result.stages],
        flops=result.flops,
        flops_dense_kernel=result.flops_dense_kernel,
        dense_flops=dense_flops(snapshot, target),
        target_flops=target.flops,
        latency_ms=(time.perf_counter() - started) * 1000.0,
        snapshot_id=result.snapshot_id,
    )


def _to_json(response: QueryResponse) -> bytes:
    """The bytes FastAPI's own `response_model` path would send (pydantic's JSON, straight to bytes)."""
    return QueryResponse.__pydantic_serializer__.to_json(response)
