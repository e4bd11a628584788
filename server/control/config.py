"""``GET /config`` and ``PATCH /config``: read and change live settings without dropping clients."""

# No ``from __future__ import annotations``: the PATCH body type is built per server (its worker cap
# goes into the OpenAPI schema), and FastAPI must see that type itself, not its name.

import asyncio
import functools
import logging
from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException
from pydantic import Field, create_model

from stoker.server.control.deps import get_engine
from stoker.server.control.models import ConfigPatch, LiveConfig
from stoker.server.control.security import require_token
from stoker.server.engine import Engine

__all__ = ["build_router"]

log = logging.getLogger(__name__)


def _current(engine: Engine) -> LiveConfig:
    config = engine.config
    return LiveConfig(
        workers=config.workers,
        max_prefetch=config.max_prefetch,
        on_error=config.on_error,
        cache_batches=config.cache_batches,
        log_level=logging.getLevelName(logging.getLogger("stoker").getEffectiveLevel()),
    )


def build_router(max_workers: int) -> APIRouter:
    """The config routes; ``workers`` is documented and validated up to this server's ``max_workers``."""
    router = APIRouter(tags=["config"])
    patch_model = create_model(
        "ConfigPatch",
        __base__=ConfigPatch,
        workers=(int | None, Field(None, ge=1, le=max_workers, description="worker processes")),
    )

    @router.get("/config", response_model=LiveConfig)
    async def read_config(engine: Annotated[Engine, Depends(get_engine)]) -> LiveConfig:
        """The live settings."""
        return _current(engine)

    @router.patch(
        "/config",
        response_model=LiveConfig,
        dependencies=[Depends(require_token)],
        responses={401: {"description": "token missing or wrong"}, 503: {"description": "engine not running"}},
    )
    async def change_config(
        patch: Annotated[patch_model, Body()],  # type: ignore[valid-type]
        engine: Annotated[Engine, Depends(get_engine)],
    ) -> LiveConfig:
        """Apply the given fields; an invalid value is a 422 naming the field and its range, changing nothing."""
        before = _current(engine)
        changes = patch.model_dump(exclude_none=True)
        engine_changes = {k: v for k, v in changes.items() if k != "log_level"}
        if engine_changes:
            if not engine.ready:
                raise HTTPException(503, "engine not running")
            try:
                reconfigure = functools.partial(engine.reconfigure, **engine_changes)
                await asyncio.wait_for(asyncio.wrap_future(engine.call(reconfigure)), 10.0)
            except (RuntimeError, TimeoutError) as exc:
                raise HTTPException(503, f"engine not answering: {exc}") from None
        if "log_level" in changes:
            logging.getLogger("stoker").setLevel(changes["log_level"])
        after = _current(engine)
        for field, old in before.model_dump().items():
            new = getattr(after, field)
            if new != old:
                log.warning("config change: %s %s -> %s", field, old, new)
        return after

    return router
