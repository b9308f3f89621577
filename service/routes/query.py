"""`POST /v1/query`: one answer on the snapshot current when the request started, from the exact table (label and
utility targets, once built), the cascade, or the embedding index alone."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Body, HTTPException, Request, Response

from cascade.batcher import Expected
from cascade.engine import DeadlineExceeded, StageReport
from cascade.errors import ExactTableNotReady, RequestError
from cascade.exact import ExactAnswer
from cascade.plan import Answer, Limits, Query, QueryPlan, execute, execute_many, plan_query, quality_note
from service.cache import cache_key
from service.dependencies import snapshot_of
from service.errors import error_responses
from service.schemas import ClusterHit, QueryBatchRequest, QueryBatchResponse, QueryRequest, QueryResponse, StageOut
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


# Kept cheap on purpose, since it is most of what HTTP adds to a small query: state and snapshot are read here
# rather than through two sub-dependencies, and the answer is serialised here, in the worker thread, and
# returned as JSON bytes; given a model, FastAPI would validate it a second time against `response_model` in
# another thread-pool hop before serialising it. `QueryResponse` is still built (so validated) once, and
# `response_model` still documents the route.
@router.post(
    "/query",
    response_model=QueryResponse,
    summary="Find the clusters that best match a target",
    responses=error_responses(408, 413, 415, 422, 503, 504),
)
def query(http: Request, request: QueryRequest = Body(openapi_examples=QUERY_EXAMPLES)) -> Response:  # noqa: B008
    """Returns the `k` best clusters for a label, a utility over classes, or example items, with the posterior
    and the value each was ranked by, and what the answer cost (FLOPs per stage, against `dense_flops`: the
    dense model on every item). Label and utility targets are answered exactly from the dense model's cluster
    posteriors once they are built; queries by example run the cascade of pair models (`stages` overrides it,
    `[]` answers from the embedding index alone). Same request, same snapshot, same answer (`seed`)."""
    state: ServiceState = http.app.state.service
    with _expecting(state, request, getattr(http.state, "admitted", None)) as expected:
        return _answer(http, request, state, expected)


def _expecting(state: ServiceState, request: QueryRequest, admitted: Expected | None) -> Any:
    """The query's announcement to the batcher: made by the query limiter when the query took its slot (so a
    batch being formed waits for it while it is still parsed and planned), else here, before it is planned;
    anything but a query by example that will run stages announces nothing."""
    if admitted is not None:
        return contextlib.nullcontext(admitted)  # the limiter cancels it when the query is done
    if state.batcher is None or request.target.examples is None or request.stages == []:
        return contextlib.nullcontext(None)
    return state.batcher.expect()


def _answer(http: Request, request: QueryRequest, state: ServiceState, expected: Expected | None) -> Response:
    query, limits = _query(request), _limits(state)
    snapshot = snapshot_of(state)
    started = time.perf_counter()
    try:
        plan = plan_query(snapshot, query, limits, state.exact_table)
    except ExactTableNotReady as exc:
        raise HTTPException(503, str(exc), {"Retry-After": "5"}) from None
    cache = state.cache
    key = ""
    if cache is not None:
        canonical = request.model_dump(mode="json")
        if plan.path == "exact":  # exact answers take no seed: equal queries share one entry
            canonical = {"target": canonical["target"], "k": request.k, "path": "exact"}
        key = cache_key(canonical, snapshot.id)
        cached = cache.get(key)
        if cached is not None:
            body = json.loads(cached)
            body["latency_ms"] = (time.perf_counter() - started) * 1000.0
            return Response(content=json.dumps(body), media_type="application/json", headers={"x-cache": "hit"})
    try:
        result = execute(plan, request.seed, getattr(http.state, "deadline", None), state.batcher, expected)
    except DeadlineExceeded as exc:  # the limiter has answered 504 already; this frees the worker
        raise HTTPException(504, str(exc)) from None
    response = _response(plan, result, started)
    if plan.path != "exact":  # what a default cascade lost to a broken registry entry (the table needs none of it)
        response.warnings = state.warnings_for(snapshot, plan.target.kind)
    note = None if request.quality is None else quality_note(snapshot, request.quality, plan.path)
    if note is not None:
        response.warnings.append(note)
    metrics = state.metrics
    for stage in response.stages:
        metrics.stage_latency.labels(variant=stage.variant).observe(stage.ms / 1000.0)
        metrics.stage_flops.labels(variant=stage.variant).inc(stage.flops)
    metrics.query_flops.observe(result.flops)
    if cache is not None:
        cache.set(key, _to_json(response.model_copy(update={"cached": True})))
    return Response(content=_to_json(response), media_type="application/json")


@router.post(
    "/query/batch",
    response_model=QueryBatchResponse,
    summary="Several queries in one request",
    responses=error_responses(408, 413, 415, 422, 503, 504),
)
def query_batch(http: Request, request: QueryBatchRequest) -> Response:
    """Each query is answered as if it were sent alone to `POST /v1/query` (same snapshot for all, each with its
    own seed: the same answer bit for bit), and the queries that run the cascade are computed as one batch.
    The cost budget (`max_query_flops`) applies to the whole request: the sum of the queries' planned FLOPs.
    A bad query is a 422 naming it (`queries[i]...`). Not cached."""
    state: ServiceState = http.app.state.service
    snapshot = snapshot_of(state)
    started = time.perf_counter()
    limit = state.settings.max_batch_request_queries
    if len(request.queries) > limit:
        raise RequestError("queries", f"at most {limit} queries per request (max_batch_request_queries)")
    limits = _limits(state)
    per_query = Limits(limits.max_k, limits.max_examples, limits.example_candidates, None)
    plans = []
    for i, q in enumerate(request.queries):
        try:
            plans.append(plan_query(snapshot, _query(q), per_query, state.exact_table))
        except RequestError as exc:
            raise RequestError(f"queries[{i}].{exc.field}", exc.message) from None
        except ExactTableNotReady as exc:
            raise HTTPException(503, f"queries[{i}]: {exc}", {"Retry-After": "5"}) from None
    total = sum(p.flops for p in plans)
    if total > limits.max_flops:  # type: ignore[operator]
        raise RequestError(
            "queries",
            f"these queries may cost {total:,} FLOPs together, over the server's budget of {limits.max_flops:,} "
            "per request (max_query_flops)",
        )
    results = execute_many(plans, [q.seed for q in request.queries], getattr(http.state, "deadline", None))
    if any(isinstance(r, DeadlineExceeded) for r in results):
        raise HTTPException(504, "deadline passed while the batch was computed")
    responses = [_response(p, r, started) for p, r in zip(plans, results, strict=True)]  # type: ignore[arg-type]
    metrics = state.metrics
    for response in responses:
        for stage in response.stages:
            metrics.stage_latency.labels(variant=stage.variant).observe(stage.ms / 1000.0)
            metrics.stage_flops.labels(variant=stage.variant).inc(stage.flops)
        metrics.query_flops.observe(response.flops)
    out = QueryBatchResponse(
        results=responses,
        flops=sum(r.flops for r in responses),
        latency_ms=(time.perf_counter() - started) * 1000.0,
    )
    return Response(content=QueryBatchResponse.__pydantic_serializer__.to_json(out), media_type="application/json")


def _query(request: QueryRequest) -> Query:
    t = request.target
    return Query(
        label=t.label,
        utility=t.utility,
        examples=t.examples,
        gains=t.gains,
        k=request.k,
        mode=request.mode,
        stages=request.stages,
        candidates=request.candidates,
        quality=request.quality,
    )


def _limits(state: ServiceState) -> Limits:
    s = state.settings
    return Limits(s.max_k, s.max_examples, s.example_candidates, s.max_query_flops)


def _response(plan: QueryPlan, result: Answer, started: float) -> QueryResponse:
    """The answer in the user's terms: cluster ids are the space's own (`Space.cluster_ids`), outputs are the
    user's labels for a classifier and the relevance grades for a pair model."""
    values = result.ranking_values if result.ranking_values is not None else result.scores
    space = plan.snapshot.space
    user_ids = space.cluster_ids[np.asarray(result.cluster_ids, dtype=np.int64)]  # type: ignore[index]
    return QueryResponse(
        mode=plan.path,
        ranking=result.ranking,
        outputs=_outputs(plan) if result.posteriors.shape[1] else [],
        clusters=[
            ClusterHit(cluster_id=int(c), score=float(s), ranking_value=float(v), posterior=[float(p) for p in post])
            for c, s, v, post in zip(user_ids, result.scores, values, result.posteriors, strict=True)
        ],
        stages=[StageOut(**vars(s)) for s in _stage_reports(plan, result)],
        flops=result.flops,
        flops_dense_kernel=result.flops_dense_kernel,
        dense_flops=plan.dense_flops,
        target_flops=plan.target.flops,
        latency_ms=(time.perf_counter() - started) * 1000.0,
        snapshot_id=result.snapshot_id,
    )


def _outputs(plan: QueryPlan) -> list[str]:
    if plan.target.kind == "classifier":
        return [str(label) for label in plan.snapshot.space.labels_known]
    grades = plan.snapshot.num_grades
    return ["other", "same_label", "same_cluster"][:grades] if grades <= 3 else [f"grade_{g}" for g in range(grades)]


def _stage_reports(plan: QueryPlan, result: Answer) -> list[StageReport]:
    """The cascade's stages; an exact answer is shown as the one step it is (the dense model's table read, no
    members sampled), the form clients of this contract have always received."""
    if not isinstance(result, ExactAnswer):
        return result.stages
    lookup = StageReport(
        variant=result.dense_name,
        version=result.dense_version,
        aggregator="exact",
        clusters_in=result.clusters_in,
        kept=plan.k,
        samples=0,
        items=0,
        flops=result.flops,
        flops_dense_kernel=result.flops_dense_kernel,
        ms=result.ms,
    )
    return [lookup]


def _to_json(response: QueryResponse) -> bytes:
    """The bytes FastAPI's own `response_model` path would send (pydantic's JSON, straight to bytes)."""
    return QueryResponse.__pydantic_serializer__.to_json(response)
