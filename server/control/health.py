"""Liveness and readiness probes. Both read :attr:`Engine.vitals` (an immutable record the engine loop
replaces at every turn), never the engine's parts: they must answer when the engine thread is stuck
or dead, which is exactly when liveness matters."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from stoker.server.control.deps import get_engine
from stoker.server.engine import Engine

router = APIRouter(tags=["health"])


@router.get("/healthz", responses={503: {"description": "the engine is dead: restart this process"}})
async def healthz(engine: Annotated[Engine, Depends(get_engine)]) -> JSONResponse:
    """200 while this process can still serve: its event loop answers and the engine thread is alive
    and turning (while starting too). 503 with the reason once the engine loop crashed or has been
    stuck for ``engine_stall_timeout_s``: the process then exits non-zero, and an orchestrator whose
    liveness probe this is restarts it."""
    dead = engine.vitals.dead(time.monotonic(), engine.config.engine_stall_timeout_s)
    if dead is not None:
        return JSONResponse({"status": "dead", "reason": dead}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/readyz", responses={503: {"description": "not ready, with the reason"}})
async def readyz(engine: Annotated[Engine, Depends(get_engine)]) -> JSONResponse:
    """200 once the worker pool is up, the data socket bound and every dataset listed; 503 with the
    reason otherwise (starting, listing, workers failing to start, draining, stopped, crashed)."""
    vitals, catalog = engine.vitals, engine.catalog
    if vitals.phase == "serving" and vitals.pool_problem is None and catalog.ready:
        return JSONResponse({"status": "ready", "endpoint": engine.endpoint})
    reason = {"starting": "starting workers", "draining": "draining", "stopped": "stopped"}.get(vitals.phase, "")
    if vitals.phase == "crashed":
        reason = vitals.crash or "crashed"
    elif vitals.phase == "serving" and vitals.pool_problem is not None:
        reason = vitals.pool_problem
    elif vitals.phase == "serving":
        waiting = [f"{e.decl.name} ({e.state}, {e.listed} samples)" for e in catalog.entries if e.state != "ready"]
        reason = "listing datasets: " + ", ".join(waiting)
    return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
