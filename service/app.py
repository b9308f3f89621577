"""`create_app(settings)`: routers, error handlers, the body limit, and the snapshot loaded in the background
so that /healthz answers at once and /readyz turns true when models and index are in memory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI

from service.errors import BodySizeLimit, install_error_handlers
from service.routes import catalog, health, query
from service.settings import Settings
from service.state import ServiceState

__all__ = ["create_app"]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    torch.set_num_threads(settings.torch_threads)
    state = ServiceState(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.load_in_background()
        yield

    app = FastAPI(
        title="prunecascade",
        version="0.1.0",
        summary="Retrieval over a structured space through a cascade of pruned networks",
        lifespan=lifespan,
    )
    app.state.service = state
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    for router in (health.router, catalog.router, query.router):
        app.include_router(router)
    return app
