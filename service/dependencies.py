"""FastAPI dependencies: the service state, and the snapshot a request runs on (503 until one is loaded)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from cascade.snapshot import Snapshot
from service.state import ServiceState

__all__ = ["get_state", "current_snapshot", "StateDep", "SnapshotDep"]


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


def current_snapshot(request: Request) -> Snapshot:
    """Taken once per request: the whole request runs on this snapshot even if a swap happens meanwhile."""
    snapshot = get_state(request).snapshot
    if snapshot is None:
        raise HTTPException(status_code=503, detail="models and index are still loading")
    return snapshot


StateDep = Annotated[ServiceState, Depends(get_state)]
SnapshotDep = Annotated[Snapshot, Depends(current_snapshot)]
