"""``GET /metrics``: Prometheus text exposition of the engine's registry."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stoker.server.control.deps import get_engine
from stoker.server.engine import Engine

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(engine: Annotated[Engine, Depends(get_engine)]) -> Response:
    """Counters, histograms and gauges; labels are bounded (stage, error code, dataset)."""
    return Response(generate_latest(engine.stats.registry), media_type=CONTENT_TYPE_LATEST)
