"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from service.dependencies import StateDep

__all__ = ["router"]

router = APIRouter(tags=["health"])


class Readiness(BaseModel):
    ready: bool
    snapshot_id: str | None = None
    error: str | None = None


# `async`: both only read memory, so they answer on the event loop without a thread-pool hop.
@router.get("/healthz")
async def healthz(state: StateDep) -> dict[str, object]:
    """Alive; while the first run builds the embedded default, how far it is (`bootstrap`: done, total, step)."""
    progress = state.bootstrap_progress
    return {"status": "ok"} if progress is None else {"status": "ok", "bootstrap": progress}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "models and index are still loading (or failed to)"}},
)
async def readyz(state: StateDep) -> JSONResponse:
    snapshot = state.snapshot
    if snapshot is None:
        progress = state.bootstrap_progress
        error = state.load_error
        if error is None and progress is not None:
            error = f"bootstrapping: {progress['done']}/{progress['total']} steps ({progress['step']})"
        return JSONResponse(status_code=503, content={"ready": False, "error": error})
    return JSONResponse(content={"ready": True, "snapshot_id": snapshot.id})
