"""``GET /``: a one-file dashboard (HTML + JS, no build step, no CDN) that polls ``/status``."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["dashboard"])
_PAGE = Path(__file__).resolve().parent / "static" / "dashboard.html"


@cache
def _page() -> str:
    return _PAGE.read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse)
async def dashboard() -> HTMLResponse:
    """Live images/s and data-stall chart, workers, clients, errors and the current config."""
    return HTMLResponse(_page())
