"""The FastAPI app factory. The app owns the engine's lifetime through its lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from stoker.server.control import config, dashboard, health, metrics, status
from stoker.server.engine import Engine
from stoker.server.settings import ServerSettings
from stoker.server.version import VERSION

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def create_app(
    engine: Engine,
    settings: ServerSettings,
    http_url: str = "",
    on_ready: Callable[[Engine], None] | None = None,
) -> FastAPI:
    """Build the app; starting it starts the engine, stopping it drains the engine."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Worker start-up blocks for a while; keep it off the event loop.
        await asyncio.to_thread(engine.start)
        if on_ready is not None:
            on_ready(engine)
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)

    app = FastAPI(
        title="stoker",
        version=VERSION,
        lifespan=lifespan,
        description="Control plane of a stoker loader server: health, status, metrics, live config.",
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.http_url = http_url
    config_router = config.build_router(engine.config.max_workers)
    for router in (health.router, status.router, metrics.router, config_router, dashboard.router):
        app.include_router(router)
    return app
