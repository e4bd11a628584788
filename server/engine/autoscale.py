"""Vertical autoscaling (engine thread): the worker pool follows ``desired_workers`` within
``autoscale_workers = "MIN:MAX"``, with hysteresis.

- No change more often than ``autoscale_interval_s`` (the first may come at once: a pool started
  outside ``MIN:MAX`` is brought inside it).
- Growing follows the demand at once (trainers waiting cost GPU time); shrinking waits until the
  surplus has lasted a whole interval (a passing lull costs nothing but CPU).
- Never below the workers the in-flight work keeps busy (the pool's busy share over the window):
  a shrink retires the least loaded workers, and a retiring worker finishes every task it holds
  first (``WorkerPool.resize``), so no batch loses work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

__all__ = ["Autoscaler"]

log = logging.getLogger(__name__)


@dataclass
class Autoscaler:
    """Decides the pool's next size; the engine applies it through its live ``workers`` setting."""

    low: int
    high: int
    interval_s: float
    _last_change: float | None = None
    _surplus_since: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high or self.interval_s <= 0:
            raise ValueError(f"autoscaling needs 1 <= MIN={self.low} <= MAX={self.high} and interval_s > 0")

    def decide(self, now: float, current: int, desired: int | None, busy: int) -> int | None:
        """The size to resize to now, or ``None`` to leave the pool as it is; ``busy``: the workers
        the in-flight work keeps busy."""
        target = current if desired is None else desired
        target = min(self.high, max(self.low, target, min(busy, self.high)))
        if target == current:
            self._surplus_since = None
            return None
        if target < current:
            # Shrink only after a surplus that lasted a whole interval.
            if self._surplus_since is None:
                self._surplus_since = now
            if now - self._surplus_since < self.interval_s and self.low <= current <= self.high:
                return None
        else:
            self._surplus_since = None
        recent = self._last_change is not None and now - self._last_change < self.interval_s
        if recent and self.low <= current <= self.high:
            return None
        self._last_change = now
        self._surplus_since = None
        log.info("autoscaling the pool from %d to %d workers (desired %s, %d busy)", current, target, desired, busy)
        return target
