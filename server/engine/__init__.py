"""The engine: the one thread that owns the data socket, the worker pool and every batch in flight."""

from stoker.server.engine.engine import Engine

__all__ = ["Engine"]
