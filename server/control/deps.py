"""Dependencies the routers use to reach the engine and the settings."""

from __future__ import annotations

from fastapi import Request

from stoker.server.engine import Engine
from stoker.server.settings import ServerSettings


def get_engine(request: Request) -> Engine:
    """The engine this app serves."""
    return request.app.state.engine


def get_settings(request: Request) -> ServerSettings:
    """The settings the server started with."""
    return request.app.state.settings
