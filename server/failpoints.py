"""Fail points: named places in the server that raise on purpose when armed, so tests can drive the
failure paths of a real server (an internal error while handling a request, a worker failing on a
sample or at start, the engine loop crashing) without replacing any component.

Armed only through the server's own environment, never from the network:
``STOKER_FAILPOINTS="engine.request,worker.sample"``. A point written ``NAME@PATH`` fires only while
the file ``PATH`` exists, so a test can arm it after the server is up and disarm it to show recovery.
Unarmed, a check is one dictionary lookup.

- ``engine.request``: the engine raises while handling a ``REQUEST`` (answered ``INTERNAL``).
- ``engine.loop``: the engine loop itself raises (the engine dies: liveness fails, the process exits 1).
- ``worker.sample``: a worker raises while rendering a sample (the batch fails ``INTERNAL``, with the
  sample's path and the worker's traceback).
- ``worker.start``: a worker fails while starting (the pool respawns it with backoff).
"""

from __future__ import annotations

import os
from functools import cache

__all__ = ["ENVIRONMENT_VARIABLE", "POINTS", "InjectedFault", "armed", "check"]

ENVIRONMENT_VARIABLE = "STOKER_FAILPOINTS"
POINTS = frozenset({"engine.request", "engine.loop", "worker.sample", "worker.start"})


class InjectedFault(RuntimeError):
    """Raised by an armed fail point."""


@cache
def armed() -> dict[str, str | None]:
    """The fail points armed in this process's environment, each with the file that gates it (``None``:
    always); unknown names are refused."""
    points: dict[str, str | None] = {}
    for entry in os.environ.get(ENVIRONMENT_VARIABLE, "").split(","):
        name, _, path = entry.strip().partition("@")
        if name:
            points[name] = path or None
    unknown = set(points) - POINTS
    if unknown:
        raise ValueError(f"{ENVIRONMENT_VARIABLE} names unknown fail points {sorted(unknown)}; known: {sorted(POINTS)}")
    return points


def check(name: str) -> None:
    """Raise :class:`InjectedFault` if fail point ``name`` is armed (and its file, if any, exists)."""
    points = armed()
    if name in points:
        gate = points[name]
        if gate is None or os.path.exists(gate):
            raise InjectedFault(f"fail point {name!r} armed by {ENVIRONMENT_VARIABLE}")
