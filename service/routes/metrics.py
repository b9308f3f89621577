"""`GET /metrics`: Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.dependencies import StateDep

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response)
def metrics(state: StateDep) -> Response:
    """Prometheus text: requests by route and status, per-stage time and FLOPs, cache, swaps, active versions,
    query limits, and the process collectors."""
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
