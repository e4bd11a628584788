"""``GET /status``: what the server is doing, as JSON."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException

from stoker.server.engine import Engine
from stoker.server.http.deps import get_engine

router = APIRouter(tags=["status"])


@router.get("/status")
async def status(engine: Annotated[Engine, Depends(get_engine)]) -> dict[str, Any]:
    """A snapshot built on the engine thread."""
    if not engine.ready:
        raise HTTPException(503, "engine not running")
    return await asyncio.wait_for(asyncio.wrap_future(engine.call(engine.snapshot)), timeout=5.0)
