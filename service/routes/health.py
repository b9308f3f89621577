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
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "models and index are still loading (or failed to)"}},
)
async def readyz(state: StateDep) -> JSONResponse:
    snapshot = state.snapshot
    if snapshot is None:
        return JSONResponse(status_code=503, content={"ready": False, "error": state.load_error})
    return JSONResponse(content={"ready": True, "snapshot_id": snapshot.id})
