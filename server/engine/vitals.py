"""The engine's vitals: the one record other threads read without asking the engine thread.

The probes must answer even when the engine thread is stuck or dead, so they cannot go through
:meth:`Engine.call`. The engine thread replaces its :class:`Vitals` whole (one atomic attribute
assignment) at every turn of its loop and at each change of state; readers see one consistent record.
Everything else the HTTP side shows is built on the engine thread (``/status``) or read from objects
that are immutable (the settings) or thread-safe (the Prometheus registry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Vitals", "Phase"]

Phase = Literal["starting", "serving", "draining", "stopped", "crashed"]


@dataclass(frozen=True, slots=True)
class Vitals:
    """What liveness and readiness are decided from."""

    phase: Phase = "starting"
    beat: float | None = None
    """``time.monotonic()`` of the loop's latest turn (``None`` before the loop runs)."""
    crash: str | None = None
    """Why the engine loop died (phase ``crashed``)."""
    pool_problem: str | None = None
    """Why the worker pool cannot serve as sized (workers failing to start)."""

    def dead(self, now: float, stall_s: float) -> str | None:
        """Why this process can no longer serve and should be restarted (``None``: alive): the engine
        loop crashed, or has not turned for ``stall_s`` seconds."""
        if self.crash is not None:
            return self.crash
        if self.phase == "serving" and self.beat is not None and now - self.beat > stall_s:
            return f"the engine loop has not turned for {now - self.beat:.0f} s (limit {stall_s:.0f} s)"
        return None
