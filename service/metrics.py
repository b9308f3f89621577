"""Prometheus metrics, one registry per app (so several apps in one process never collide), and the ASGI
middleware timing every request by route template and status."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Metrics", "MetricsMiddleware"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


disable_created_metrics()  # no `*_created` series: prometheus-client's recommended setting for new exporters


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):  # process_*, python_* as by default
            r.register(collector)
        self.requests = Counter(
            "prunecascade_requests",
            "HTTP requests by route template and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "prunecascade_request_seconds",
            "HTTP request latency by route template and status",
            ["route", "method", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_latency = Histogram(
            "prunecascade_stage_seconds",
            "Wall time of one cascade stage",
            ["variant"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_flops = Counter(
            "prunecascade_stage_flops", "Nonzero-weight FLOPs spent by cascade stages", ["variant"], registry=r
        )
        self.query_flops = Histogram(
            "prunecascade_query_flops",
            "FLOPs of one query (sum of its stages)",
            buckets=(1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11),
            registry=r,
        )
        self.cache_hits = Counter("prunecascade_cache_hits", "Query result cache hits", ["backend"], registry=r)
        self.cache_misses = Counter("prunecascade_cache_misses", "Query result cache misses", ["backend"], registry=r)
        self.active_version = Gauge(
            "prunecascade_active_version_info",
            "1 for the version of each model the current snapshot serves",
            ["name", "version", "sha256"],
            registry=r,
        )
        self.snapshot = Gauge(
            "prunecascade_snapshot_info", "1 for the current snapshot id", ["snapshot_id"], registry=r
        )
        self.swaps = Counter("prunecascade_swaps", "Snapshot swaps by cause", ["reason"], registry=r)
        self.redis_errors = Counter("prunecascade_redis_errors", "Failed Redis operations", ["op"], registry=r)
        self.redis_up = Gauge("prunecascade_redis_up", "1 while Redis answers (absent without Redis)", registry=r)
        self.uploads = Counter("prunecascade_uploads", "Checkpoint uploads by outcome", ["outcome"], registry=r)
        self.query_inflight = Gauge("prunecascade_query_inflight", "Queries holding a compute slot", registry=r)
        self.query_queued = Gauge("prunecascade_query_queued", "Queries waiting for a compute slot", registry=r)
        self.query_rejected = Counter(
            "prunecascade_query_rejected",
            "Queries refused by the limits: queue_full (503) or deadline (504)",
            ["reason"],
            registry=r,
        )
        self.query_queue_seconds = Histogram(
            "prunecascade_query_queue_seconds",
            "Time a query waited for a compute slot",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def set_active(self, versions: Mapping[str, tuple[int, str]], snapshot_id: str) -> None:
        """Replace the info series: exactly one per served model, and one for the snapshot."""
        self.active_version.clear()
        for name, (version, sha) in versions.items():
            self.active_version.labels(name=name, version=str(version), sha256=sha[:12]).set(1)
        self.snapshot.clear()
        self.snapshot.labels(snapshot_id=snapshot_id).set(1)


class MetricsMiddleware:
    """Pure ASGI: labels by the matched route's template (`/v1/admin/models/{name}/activate`), never the raw
    path, so fuzzed URLs cannot blow up the label cardinality."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # The labelled children, looked up once per (route template, method, status): as many as the series
        # themselves, so no more than the metrics already hold.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            key = (template, scope.get("method", ""), status[0])
            children = self._children.get(key)
            if children is None:
                labels = {"route": key[0], "method": key[1], "status": str(key[2])}
                children = (self.metrics.requests.labels(**labels), self.metrics.latency.labels(**labels))
                self._children[key] = children
            children[0].inc()
            children[1].observe(elapsed)
