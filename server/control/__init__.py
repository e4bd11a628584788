"""The HTTP control plane: health, status, metrics, live config and a dashboard (FastAPI)."""

from stoker.server.control.app import create_app

__all__ = ["create_app"]
