"""The FastAPI app factory. The app owns the engine's lifetime through its lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from stoker.server.engine import VERSION, Engine
from stoker.server.http import health, status
from stoker.server.settings import ServerSettings

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def create_app(
    engine: Engine, settings: ServerSettings, on_ready: Callable[[Engine], None] | None = None
) -> FastAPI:
    """Build the app; starting it starts the engine, stopping it drains the engine."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Worker start-up blocks for a while: keep the event loop answering /healthz meanwhile.
        await asyncio.to_thread(engine.start)
        if on_ready is not None:
            on_ready(engine)
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="stoker", version=VERSION, lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.include_router(health.router)
    app.include_router(status.router)
    return app
