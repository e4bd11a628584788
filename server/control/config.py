"""``GET /config`` and ``PATCH /config``: read and change live settings without dropping clients.

The live settings are the fields the settings model marks live; ``log_level`` belongs to this
process, every other one to the engine, which applies it on its own thread.
"""

# No ``from __future__ import annotations``: the PATCH body type is built per server (its worker cap
# goes into the OpenAPI schema), and FastAPI must see that type itself, not its name.

import asyncio
import functools
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException
from pydantic import BaseModel

from stoker.server.control.deps import get_engine
from stoker.server.control.security import require_token
from stoker.server.engine import Engine
from stoker.server.settings.live import LiveConfig, patch_model

__all__ = ["build_router", "live_config", "log_level"]

log = logging.getLogger(__name__)
_PROCESS_FIELDS = frozenset({"log_level"})


def log_level() -> str:
    """The level of the ``stoker`` loggers."""
    return logging.getLevelName(logging.getLogger("stoker").getEffectiveLevel())


def live_config(engine: Engine) -> BaseModel:
    """The live settings now."""
    values: dict[str, Any] = {name: getattr(engine.config, name) for name in engine.config.live_fields}
    return LiveConfig(**values, log_level=log_level())


def build_router(max_workers: int) -> APIRouter:
    """The config routes; ``workers`` is documented and validated up to this server's ``max_workers``."""
    router = APIRouter(tags=["config"])
    patch_type = patch_model(max_workers)

    @router.get("/config", response_model=LiveConfig)
    async def read_config(engine: Annotated[Engine, Depends(get_engine)]) -> BaseModel:
        """The live settings."""
        return live_config(engine)

    @router.patch(
        "/config",
        response_model=LiveConfig,
        dependencies=[Depends(require_token)],
        responses={401: {"description": "token missing or wrong"}, 503: {"description": "engine not running"}},
    )
    async def change_config(
        patch: Annotated[patch_type, Body()],  # type: ignore[valid-type]
        engine: Annotated[Engine, Depends(get_engine)],
    ) -> BaseModel:
        """Apply the given fields; an invalid value is a 422 naming the field and its range, changing nothing."""
        before = live_config(engine)
        changes = patch.model_dump(exclude_none=True)
        engine_changes = {k: v for k, v in changes.items() if k not in _PROCESS_FIELDS}
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
        after = live_config(engine)
        for field, old in before.model_dump().items():
            new = getattr(after, field)
            if new != old:
                log.warning("config change: %s %s -> %s", field, old, new)
        return after

    return router
