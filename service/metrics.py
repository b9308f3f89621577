"""Prometheus metrics, one registry per app (so several apps in one process never collide), and the ASGI
middleware timing every request by route template and status, including requests refused before the router
ran (the body-size limit's 413, the query limiter's 503 and 504): those are labelled by the route the router
would have chosen, and a refused checkpoint upload is counted in `prunecascade_uploads_total` wherever it was
refused."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
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
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Metrics", "MetricsMiddleware", "UPLOAD_ROUTE", "route_template"]

UPLOAD_ROUTE = ("POST", "/v1/admin/models")
"""The checkpoint upload (`service/routes/admin.py upload_model`): every 4xx answer to it is a refused upload."""

# Per request: [True] once `prunecascade_uploads_total` was counted for it (by the upload route itself), so the
# middleware counts an upload that never reached the route (body too large, no token, unparseable form) once.
_upload_counted: ContextVar[list[bool] | None] = ContextVar("prunecascade_upload_counted", default=None)

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
        self.batches = Counter(
            "prunecascade_batches", "Batches of concurrent queries computed together (cascade.batcher)", registry=r
        )
        self.batched_queries = Counter(
            "prunecascade_batched_queries",
            "Queries computed in those batches (over batches: mean batch size)",
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
        self.registry_broken = Gauge(
            "prunecascade_registry_broken",
            "1 for each active registry entry that could not be loaded (its previous good version, if any, is served; "
            "version `unknown`: ACTIVE does not read)",
            ["name", "version"],
            registry=r,
        )
        self.swaps = Counter("prunecascade_swaps", "Snapshot swaps by cause", ["reason"], registry=r)
        self.redis_errors = Counter("prunecascade_redis_errors", "Failed Redis operations", ["op"], registry=r)
        self.redis_up = Gauge("prunecascade_redis_up", "1 while Redis answers (absent without Redis)", registry=r)
        self.uploads = _MarkingCounter(
            Counter("prunecascade_uploads", "Checkpoint uploads by outcome", ["outcome"], registry=r)
        )
        self.query_inflight = Gauge("prunecascade_query_inflight", "Queries holding a compute slot", registry=r)
        self.query_inflight_heavy = Gauge(
            "prunecascade_query_inflight_heavy",
            "Heavy queries (over HEAVY_QUERY_FLOPS) holding a compute slot; at most MAX_CONCURRENT_QUERIES - "
            "RESERVED_SLOTS",
            registry=r,
        )
        self.query_queued = Gauge("prunecascade_query_queued", "Queries waiting for a compute slot", registry=r)
        self.query_rejected = Counter(
            "prunecascade_query_rejected",
            "Queries refused by the limits: queue_full (503), deadline (504) or slow_body (408)",
            ["reason"],
            registry=r,
        )
        self.bodies_pending = Gauge(
            "prunecascade_request_bodies_pending",
            "Queries whose body is still arriving (they hold no compute slot nor queue place meanwhile)",
            registry=r,
        )
        self.query_queue_seconds = Histogram(
            "prunecascade_query_queue_seconds",
            "Time a query waited for a compute slot",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def set_broken(self, faults: Sequence[tuple[str, int | None]]) -> None:
        """Replace the broken-entry series: one per active registry entry the current snapshot could not load."""
        self.registry_broken.clear()
        for name, version in faults:
            self.registry_broken.labels(name=name, version="unknown" if version is None else str(version)).set(1)

    def set_active(self, versions: Mapping[str, tuple[int, str]], snapshot_id: str) -> None:
        """Replace the info series: exactly one per served model, and one for the snapshot."""
        self.active_version.clear()
        for name, (version, sha) in versions.items():
            self.active_version.labels(name=name, version=str(version), sha256=sha[:12]).set(1)
        self.snapshot.clear()
        self.snapshot.labels(snapshot_id=snapshot_id).set(1)


class _MarkingChild:
    def __init__(self, child: Any) -> None:
        self._child = child

    def inc(self, amount: float = 1.0) -> None:
        self._child.inc(amount)
        mark = _upload_counted.get()
        if mark is not None:
            mark[0] = True


class _MarkingCounter:
    """A labelled counter whose increments mark the current request as counted (the request's context is copied
    into the worker thread of a sync route, and the mark is a list, so the middleware sees the route's mark)."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    def labels(self, **labels: str) -> _MarkingChild:
        return _MarkingChild(self.counter.labels(**labels))


def route_template(scope: Scope, templates: Sequence[tuple[re.Pattern[str], str]]) -> str:
    """The template of the route that served the request; for a request answered before the router ran, the
    first of `templates` (compiled OpenAPI paths, in route order) that its path matches; else `unmatched`, so the
    label's values stay the app's templates whatever the URL."""
    path = getattr(scope.get("route"), "path", None)
    if path:
        return path
    raw = scope.get("path", "")
    return next((template for regex, template in templates if regex.match(raw)), "unmatched")


def _compiled_templates(app: Any) -> list[tuple[re.Pattern[str], str]]:
    """Every path template of the app's OpenAPI document (the public list of its routes, whatever the router's
    internals), compiled as Starlette compiles route paths."""
    try:
        paths = list(app.openapi()["paths"])
    except Exception:  # not a FastAPI app, or no schema: refusals before routing stay `unmatched`
        return []
    return [(compile_path(template)[0], template) for template in paths]


class MetricsMiddleware:
    """Pure ASGI: labels by the route's template (`/v1/admin/models/{name}/activate`), never the raw path, so
    fuzzed URLs cannot blow up the label cardinality. It sits outside the query limiter and the body-size limit,
    so their refusals are counted here under their route, and a refused upload in `prunecascade_uploads_total`."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # The labelled children, looked up once per (route template, method, status): as many as the series
        # themselves, so no more than the metrics already hold.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._templates: list[tuple[re.Pattern[str], str]] | None = None  # built on the first unrouted request

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

        upload_mark = _upload_counted.set([False])
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - started
            counted = _upload_counted.get()
            _upload_counted.reset(upload_mark)
            if scope.get("route") is None and self._templates is None:
                self._templates = _compiled_templates(scope.get("app"))
            key = (route_template(scope, self._templates or ()), scope.get("method", ""), status[0])
            if (key[1], key[0]) == UPLOAD_ROUTE and 400 <= key[2] < 500 and counted is not None and not counted[0]:
                self.metrics.uploads.labels(outcome="refused").inc()
            children = self._children.get(key)
            if children is None:
                labels = {"route": key[0], "method": key[1], "status": str(key[2])}
                children = (self.metrics.requests.labels(**labels), self.metrics.latency.labels(**labels))
                self._children[key] = children
            children[0].inc()
            children[1].observe(elapsed)
