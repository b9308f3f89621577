"""Re-tuning the default pair cascade in a running server (bearer token), for example after a new variant is
activated: `POST /v1/admin/tune` starts it in the background and answers 202 at once; `GET /v1/admin/tune`
says how it is going. When it is done, the chosen plan is swapped in as the default cascade the way models are
(`ServiceState.set_cascade`: a complete snapshot first, one assignment, queries in flight finish on the old
one). A tuning whose models were replaced while it measured is not applied (it measured other models)."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from cascade.errors import RequestError
from cascade.snapshot import Snapshot
from service.auth import require_admin
from service.dependencies import StateDep, current_snapshot
from service.errors import error_responses
from service.state import ConflictError, ServiceState

__all__ = ["router", "TuneRequest", "TuneJobOut"]

log = logging.getLogger("prunecascade")

router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin), Depends(current_snapshot)],
    responses=error_responses(401, 403, 503),
)


class TuneRequest(BaseModel):
    """At most one of quality, flops and ms (none: quality 0.99)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    quality: float | None = Field(None, gt=0, le=1, description="relative nDCG@10 to the dense rerank to reach")
    flops: float | None = Field(None, gt=0, description="instead: the best plan within this many FLOPs per query")
    ms: float | None = Field(None, gt=0, description="instead: the best plan within this median ms per query")
    confidence: float = Field(0.95, gt=0.5, lt=1)
    dev_queries: int | None = Field(None, ge=2, description="the first N dev queries only (default: all)")
    max_plans: int = Field(60, ge=3, le=500)
    max_seconds: float = Field(150.0, gt=0, le=3600, description="no refinement round starts after this")
    candidates: int | None = Field(None, ge=1, description="the dense rerank's M (default: example_candidates)")


class TuneJobOut(BaseModel):
    state: Literal["idle", "running", "applied", "discarded", "failed"]
    target: str | None = None
    started_at: str | None = None
    seconds: float | None = None
    chosen: str | None = Field(None, description="the plan the tuning chose")
    reason: str | None = None
    snapshot_id: str | None = Field(None, description="the snapshot that serves the tuned plan (applied)")
    detail: str | None = Field(None, description="why it was discarded or failed")


class _Job:
    """The one tuning of this process (one at a time: a second request while it runs is a 409)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.out = TuneJobOut(state="idle")
        self.thread: threading.Thread | None = None
        self.started = 0.0


def _job(request: Request) -> _Job:
    job = getattr(request.app.state, "tuning_job", None)
    if job is None:
        job = request.app.state.tuning_job = _Job()
    return job


def _models(snapshot: Snapshot) -> dict[str, tuple[int, str]]:
    return {v.name: (v.version, v.manifest.sha256) for v in snapshot.variants.values()}


def _run(state: ServiceState, job: _Job, snapshot: Snapshot, options: Any) -> None:
    from cascade.tuner import tune, tuned_config

    try:
        result = tune(snapshot, options, say=log.info)
        with state.lock:  # no activation between the check and the swap
            current = state.require_snapshot()
            if _models(current) != _models(snapshot):
                update: dict[str, Any] = dict(
                    state="discarded", detail="the models changed while it measured: tune again"
                )
            else:
                swapped = state.set_cascade(tuned_config(state.config, result))
                update = dict(state="applied", snapshot_id=swapped.id)
        update.update(chosen=result.record.chosen.name, reason=result.record.reason)
    except Exception as exc:  # reported by GET /v1/admin/tune; the served plan is untouched
        log.exception("tuning failed")
        update = dict(state="failed", detail=f"{type(exc).__name__}: {exc}")
    with job.lock:
        job.out = job.out.model_copy(update={**update, "seconds": round(time.perf_counter() - job.started, 2)})


@router.post("/tune", status_code=202, response_model=TuneJobOut, responses=error_responses(409, 413, 415, 422))
def start_tuning(state: StateDep, http: Request, body: Annotated[TuneRequest | None, Body()] = None) -> TuneJobOut:
    """Tune the default pair cascade on the dev queries of the served snapshot, in the background (one thread of
    this process, beside the queries); the new plan is swapped in atomically when it is done. 409 while a tuning
    runs."""
    from cascade.tuner import TuneOptions
    from cascade.tuning_record import TuneTarget

    body = body or TuneRequest()
    given = [k for k in ("quality", "flops", "ms") if getattr(body, k) is not None]
    if len(given) > 1:
        raise RequestError(given[1], "give at most one of quality, flops and ms")
    kind = given[0] if given else "quality"
    value = getattr(body, kind) if given else 0.99
    target = TuneTarget(kind=kind, value=value, confidence=body.confidence)  # type: ignore[arg-type]
    snapshot = state.require_snapshot()
    if snapshot.config.pair_dense is None or snapshot.embedding is None or snapshot.queries is None:
        raise ConflictError("this space has no pair models or no held-out queries: nothing to tune")
    options = TuneOptions(
        target=target,
        candidates=body.candidates or state.settings.example_candidates,
        dev_queries=body.dev_queries,
        test=False,
        max_plans=body.max_plans,
        max_seconds=body.max_seconds,
        progress=False,
    )
    job = _job(http)
    with job.lock:
        if job.out.state == "running":
            raise ConflictError("a tuning is running already: GET /v1/admin/tune")
        job.started = time.perf_counter()
        job.out = TuneJobOut(
            state="running", target=target.describe(), started_at=datetime.now(UTC).isoformat(timespec="seconds")
        )
        job.thread = threading.Thread(target=_run, args=(state, job, snapshot, options), name="tuner", daemon=True)
        job.thread.start()
        return job.out


@router.get("/tune", response_model=TuneJobOut)
def tuning_status(http: Request, response: Response) -> TuneJobOut:
    """The last tuning of this process: running, applied (with the snapshot serving it), discarded or failed."""
    job = _job(http)
    with job.lock:
        out = job.out
        if out.state == "running":
            out = out.model_copy(update={"seconds": round(time.perf_counter() - job.started, 2)})
    return out
