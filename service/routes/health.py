"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from service.dependencies import StateDep

__all__ = ["router"]

router = APIRouter(tags=["health"])


class Readiness(BaseModel):
    ready: bool
    snapshot_id: str | None = None
    progress: dict[str, object] | None = Field(
        None, description="while the first run builds the embedded default: done, total and the current step"
    )
    error: str | None = Field(
        None,
        description="why loading failed (never set merely because it is in progress); with `ready` true, why the first "
        "run's bootstrap failed after the service could answer: what is served is what it had built by then",
    )


# `async`: both only read memory, so they answer on the event loop without a thread-pool hop.
@router.get("/healthz")
async def healthz(state: StateDep) -> dict[str, object]:
    """Alive; while the first run builds the embedded default, how far it is (`bootstrap`: done, total, step), and
    where that failed, the step it stopped at and `error`."""
    progress, error = state.bootstrap_progress, state.load_error
    body: dict[str, object] = {"status": "ok"}
    if progress is not None:
        body["bootstrap"] = progress
    if error is not None:
        body["error"] = error
    return body


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "models and index are still loading (or failed to)"}},
)
async def readyz(state: StateDep) -> JSONResponse:
    """200 once models, space and index are in memory; 503 before, with the bootstrap's `progress` while it
    runs, or the load `error` if loading failed. A first run that could answer before its bootstrap ended stays
    ready should the rest of the bootstrap fail, with its `error` here too."""
    snapshot = state.snapshot
    if snapshot is None:
        content = {"ready": False, "progress": state.bootstrap_progress, "error": state.load_error}
        return JSONResponse(status_code=503, content=content)
    content = {"ready": True, "snapshot_id": snapshot.id}
    if state.load_error is not None:  # what failed after a first run's early load, which is still served
        content["error"] = state.load_error
    return JSONResponse(content=content)
