"""`create_app(settings)`: routers, error handlers, middleware (request id + JSON access log, metrics, body
limit), the result cache and, with Redis, the shared registry state. The snapshot loads in the background so
that /healthz answers at once and /readyz turns true when models and index are in memory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI

from service.admission import announce_query, heavy_query
from service.auth import AdminGate
from service.cache import LocalCache, RedisCache
from service.docs_ui import install_offline_docs
from service.errors import install_error_handlers
from service.limits import BodySizeLimit, QueryLimiter
from service.logs import RequestIdMiddleware, setup_logging
from service.metrics import Metrics, MetricsMiddleware
from service.preload import take_preloaded
from service.reader_training import ReaderTraining
from service.redis_link import RedisLink
from service.routes import admin, catalog, health, inspect, metrics, query, tuning
from service.settings import Settings
from service.shared_state import SharedState
from service.state import ServiceState

__all__ = ["create_app"]


log = logging.getLogger("prunecascade")


def create_app(settings: Settings | None = None, before_load: Callable[[ServiceState], None] | None = None) -> FastAPI:
    """`before_load(state)` runs in the loader thread before the first load (`serve --bootstrap` builds the
    embedded default there), so that the port opens at once (/healthz reports the progress, /readyz is 503 until
    ready). The app itself imports nothing that builds: the caller passes the builder in."""
    settings = settings or Settings()
    setup_logging(settings.log_level, settings.log_json)
    torch.set_num_threads(settings.torch_threads)
    state = ServiceState(settings, Metrics(), take_preloaded())  # a forked worker's: the home its parent read
    if settings.train_reader:
        state.reader_training = ReaderTraining(state)
    link: RedisLink | None = None
    if settings.redis_url:
        link = RedisLink(
            settings.redis_url, settings.redis_prefix, settings.redis_timeout_s, settings.redis_retry_s, state.metrics
        )
        if settings.cache_enabled:
            fallback = LocalCache(settings.cache_ttl_s, settings.cache_fallback_entries, state.metrics, "fallback")
            state.cache = RedisCache(link, settings.cache_ttl_s, state.metrics, fallback)
        state.shared = SharedState(link, state, settings.reconcile_interval_s)
    elif settings.cache_enabled:
        state.cache = LocalCache(settings.cache_ttl_s, settings.cache_max_entries, state.metrics)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.load_in_background(None if before_load is None else lambda: before_load(state))
        if state.reader_training is not None:
            state.reader_training.start()  # waits for the first load, then trains only where no reader is stored
        if state.shared is not None:
            state.shared.start()  # waits for the first load, then reconciles with Redis
        if settings.resolved_admin_token() is None:
            log.warning(
                "no admin token configured: the admin routes answer 403 (set PRUNECASCADE_ADMIN_TOKEN, or run "
                "`prunecascade serve --bootstrap` once to generate one into HOME/admin-token)"
            )
        elif settings.token_was_stripped():
            log.warning("the admin token had surrounding whitespace; it was stripped (send it without)")
        yield
        if state.reader_training is not None:
            state.reader_training.stop()
        if state.shared is not None:
            state.shared.stop()
        if link is not None:
            link.close()

    app = FastAPI(
        title="prunecascade",
        version="0.1.0",
        summary="Retrieval over a structured space through a cascade of pruned networks",
        lifespan=lifespan,
    )
    app.state.service = state
    install_error_handlers(app)
    # Outermost last: request id -> metrics -> admin token -> body limits -> query limits -> routes. The query
    # limiter reads the whole body (bounded, timed) before it gives out a slot, so a slow body never holds query
    # capacity; the admin token is checked before anything reads an admin route's body.
    app.add_middleware(
        QueryLimiter,
        paths=("/v1/query", "/v1/query/batch"),
        concurrency=settings.max_concurrent_queries,
        queue=settings.max_queued_queries,
        timeout_s=settings.query_timeout_s,
        retry_after_s=settings.retry_after_s,
        metrics=state.metrics,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
        heavy=heavy_query(state),
        reserved_slots=settings.reserved_slots,
        on_admit=announce_query(state),
    )
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        per_path={path: settings.max_upload_bytes for path in ("/v1/admin/models", "/v1/admin/reader")},
        body_timeout_s=settings.body_timeout_s,
    )
    app.add_middleware(AdminGate, token=settings.resolved_admin_token)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.add_middleware(RequestIdMiddleware)
    # The router tries routes in order: the hot one first (no path here overlaps another, so order is free).
    for router in (query.router, health.router, metrics.router, catalog.router, inspect.router, admin.router):
        app.include_router(router)
    app.include_router(tuning.router)  # POST/GET /v1/admin/tune: re-tune the default pair cascade
    install_offline_docs(app)  # /docs and /redoc without a CDN
    return app
