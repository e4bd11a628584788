"""Worker processes: the pool (engine side), the worker loop (worker side) and shared-memory slots."""

from stoker.server.workers.pool import WorkerPool

__all__ = ["WorkerPool"]
