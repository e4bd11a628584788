"""``GET /status``: what the server is doing, as JSON documented by :class:`Status`."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request

from stoker.server.control.config import log_level
from stoker.server.control.deps import get_engine
from stoker.server.engine import Engine
from stoker.server.engine.state import build_status
from stoker.server.engine.status_models import Status

router = APIRouter(tags=["status"])


@router.get("/status", response_model=Status, responses={503: {"description": "the engine is not running"}})
async def status(request: Request, engine: Annotated[Engine, Depends(get_engine)]) -> Status:
    """Version, uptime, endpoints, pool, datasets, jobs, clients, stage times, errors and bad samples:
    built on the engine's own thread (503 when it is not running)."""
    if engine.stopped.is_set() or not engine.started.is_set():
        raise HTTPException(503, "engine not running")
    built = engine.call(build_status, engine, request.app.state.http_url, log_level())
    try:
        return await asyncio.wait_for(asyncio.wrap_future(built), timeout=5.0)
    except (RuntimeError, TimeoutError) as exc:
        raise HTTPException(503, f"engine not answering: {exc}") from None
