"""The FastAPI app factory. The app owns the engine's lifetime through its lifespan."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse

from stoker.server.control import config, dashboard, health, metrics, status
from stoker.server.control.security import require_read_token
from stoker.server.engine import Engine
from stoker.server.settings import ServerSettings
from stoker.server.version import VERSION

__all__ = ["create_app"]

log = logging.getLogger(__name__)


class Startup(threading.Thread):
    """Starts the engine (workers, data socket), then lists the declared datasets, off the event loop,
    so ``/healthz`` answers from the first moment and ``/readyz`` says what is still being done."""

    def __init__(
        self,
        engine: Engine,
        on_ready: Callable[[Engine], None] | None,
        on_failed: Callable[[str], None] | None,
    ) -> None:
        super().__init__(name="stoker-startup", daemon=True)
        self.engine, self.on_ready, self.on_failed = engine, on_ready, on_failed

    def run(self) -> None:
        try:
            self.engine.start()
        except Exception as exc:  # workers that cannot start, a socket that cannot bind
            log.error("the engine could not start: %s", exc, exc_info=True)
            self._fail(f"the engine could not start: {exc}")
            return
        if not self.engine.catalog.load_declared():
            reasons = "; ".join(entry.error or entry.decl.name for entry in self.engine.catalog.failed)
            self._fail(reasons)
            return
        if self.on_ready is not None:
            self.on_ready(self.engine)

    def _fail(self, reason: str) -> None:
        if self.on_failed is not None:
            self.on_failed(reason)


def create_app(
    engine: Engine,
    settings: ServerSettings,
    http_url: str = "",
    on_ready: Callable[[Engine], None] | None = None,
    on_failed: Callable[[str], None] | None = None,
) -> FastAPI:
    """Build the app; starting it starts the engine and the listing of datasets in the background,
    stopping it drains the engine. ``on_ready`` runs once serving; ``on_failed`` when start-up failed."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        startup = Startup(engine, on_ready, on_failed)
        startup.start()
        try:
            yield
        finally:
            # A stop during start-up waits a little for it (a listing may take minutes: not for that).
            await asyncio.to_thread(startup.join, engine.config.drain_timeout_s)
            await asyncio.to_thread(engine.close)

    # Behind a token everything but the probes is closed: the schema needs it, the browser docs are off.
    open_docs = settings.http_token is None or settings.http_public_reads
    app = FastAPI(
        title="stoker",
        version=VERSION,
        lifespan=lifespan,
        **({} if open_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}),
        description="Control plane of a stoker loader server: health, status, metrics, live config.",
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.http_url = http_url
    if not open_docs:
        # The schema stays readable with the token (clients and fuzzers generate from it).
        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_read_token)])
        async def openapi_schema() -> JSONResponse:
            return JSONResponse(app.openapi())

    config_router = config.build_router(engine.config.max_workers)
    app.include_router(health.router)  # the probes: always open, they tell nothing about the data
    for router in (status.router, metrics.router, config_router, dashboard.router):
        app.include_router(router, dependencies=[Depends(require_read_token)])
    return app
