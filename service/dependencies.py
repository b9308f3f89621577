"""FastAPI dependencies: the service state, and the snapshot a request runs on (503 until one is loaded)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from cascade.snapshot import Snapshot
from service.state import ServiceState

__all__ = ["get_state", "current_snapshot", "snapshot_of", "StateDep", "SnapshotDep"]


async def get_state(request: Request) -> ServiceState:
    """`async` on purpose (here and below): FastAPI runs a plain `def` dependency in its thread pool, and two
    thread hops per request cost more than these attribute reads; neither blocks the event loop."""
    return request.app.state.service


async def current_snapshot(request: Request) -> Snapshot:
    """Taken once per request: the whole request runs on this snapshot even if a swap happens meanwhile."""
    return snapshot_of(request.app.state.service)


def snapshot_of(state: ServiceState) -> Snapshot:
    """The current snapshot, or 503 until one is loaded (for a route that reads it without a dependency)."""
    snapshot = state.snapshot
    if snapshot is None:
        raise HTTPException(status_code=503, detail="models and index are still loading")
    return snapshot


StateDep = Annotated[ServiceState, Depends(get_state)]
SnapshotDep = Annotated[Snapshot, Depends(current_snapshot)]
