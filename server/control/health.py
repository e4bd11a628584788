"""Liveness and readiness probes."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from stoker.server.control.deps import get_engine
from stoker.server.engine import Engine

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """200 while the process and its event loop answer."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "not ready, with the reason"}})
async def readyz(engine: Annotated[Engine, Depends(get_engine)]) -> JSONResponse:
    """200 once the worker pool is up, the data socket bound and every dataset listed; 503 with the
    reason otherwise."""
    catalog = engine.catalog
    if engine.ready and catalog.ready:
        return JSONResponse({"status": "ready", "endpoint": engine.endpoint})
    reason = "draining" if engine.started.is_set() else "starting workers"
    if engine.ready:
        waiting = [f"{e.decl.name} ({e.state}, {e.listed} samples)" for e in catalog.entries if e.state != "ready"]
        reason = "listing datasets: " + ", ".join(waiting)
    if engine.stopped.is_set():
        reason = "stopped"
    return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
