"""Fail points: named places in the server that raise on purpose when armed, so tests can drive the
failure paths of a real server (an internal error while handling a request, a worker failing on a
sample for a reason that is not the file's) without replacing any component.

Armed only through the server's own environment, never from the network:
``STOKER_FAILPOINTS="engine.request,worker.sample"``. Unarmed, a check is one frozenset lookup.

- ``engine.request``: the engine raises while handling a ``REQUEST`` (answered ``INTERNAL``).
- ``worker.sample``: a worker raises while rendering a sample (the batch fails ``INTERNAL``, with the
  sample's path and the worker's traceback).
"""

from __future__ import annotations

import os
from functools import cache

__all__ = ["ENVIRONMENT_VARIABLE", "POINTS", "InjectedFault", "armed", "check"]

ENVIRONMENT_VARIABLE = "STOKER_FAILPOINTS"
POINTS = frozenset({"engine.request", "worker.sample"})


class InjectedFault(RuntimeError):
    """Raised by an armed fail point."""


@cache
def armed() -> frozenset[str]:
    """The fail points armed in this process's environment; unknown names are refused."""
    names = frozenset(name.strip() for name in os.environ.get(ENVIRONMENT_VARIABLE, "").split(",") if name.strip())
    unknown = names - POINTS
    if unknown:
        raise ValueError(f"{ENVIRONMENT_VARIABLE} names unknown fail points {sorted(unknown)}; known: {sorted(POINTS)}")
    return names


def check(name: str) -> None:
    """Raise :class:`InjectedFault` if fail point ``name`` is armed."""
    if name in armed():
        raise InjectedFault(f"fail point {name!r} armed by {ENVIRONMENT_VARIABLE}")
