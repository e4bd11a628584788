"""Replacing workers that fail to start: capped exponential backoff, and the problem it reports.

A worker that dies while serving is replaced at once (the pool's business). One that dies before it
reported ready (a broken environment, memory exhausted, a plugin that cannot import) is replaced only
after a wait that doubles with each such failure in a row, up to a cap, so a cause that persists costs
a few attempts a minute instead of a tight loop. After :data:`FAILURES_BEFORE_UNREADY` failures in a
row :attr:`StartFailures.problem` names the reason (readiness and ``/status`` show it); the first
worker that starts clears it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

__all__ = ["RestartBackoff", "StartFailures", "FAILURES_BEFORE_UNREADY"]

log = logging.getLogger(__name__)

FAILURES_BEFORE_UNREADY = 3
"""Start failures in a row after which the pool reports a problem (the server is not ready)."""


@dataclass(frozen=True, slots=True)
class RestartBackoff:
    """How long to wait before replacing a worker that failed to start: ``initial_s`` after the first
    failure, doubling with each failure in a row, never more than ``max_s``."""

    initial_s: float
    max_s: float

    def delay(self, failures: int) -> float:
        """The wait after ``failures`` start failures in a row (``failures`` >= 1)."""
        return min(self.max_s, self.initial_s * 2 ** min(failures - 1, 32))


class StartFailures:
    """Workers that failed to start, in a row, and the replacements owed once the backoff is over."""

    def __init__(self, backoff: RestartBackoff) -> None:
        self.backoff = backoff
        self.count = 0
        self.last_reason = ""
        self.owed = 0
        """Replacements waiting for :attr:`retry_at`."""
        self.retry_at = 0.0
        self._said = ""

    def said(self, reason: str) -> None:
        """The worker starting now reported why it failed (its ``StartFailed`` message)."""
        self._said = reason

    def failed(self, worker_id: int, exitcode: int | None) -> None:
        """A worker died before it was ready: owe a replacement after the backoff."""
        self.count += 1
        self.last_reason = self._said or f"exited with code {exitcode} before it was ready"
        self._said = ""  # the next attempt says its own
        delay = self.backoff.delay(self.count)
        self.retry_at = time.monotonic() + delay
        self.owed += 1
        log.warning(
            "worker %d failed to start (%d in a row): %s; next try in %.1f s",
            worker_id, self.count, self.last_reason, delay,
        )  # fmt: skip

    def started(self, worker_id: int) -> None:
        """A worker reported ready: the failures in a row are over."""
        if self.count:
            log.info("worker %d started after %d failed starts: recovered", worker_id, self.count)
        self.count, self.last_reason, self._said = 0, "", ""

    def due(self, now: float) -> int:
        """Replacements to start now (their backoff is over); they are no longer owed."""
        if not self.owed or now < self.retry_at:
            return 0
        owed, self.owed = self.owed, 0
        return owed

    def limit(self, wanted: int) -> int:
        """Owe no more than ``wanted`` replacements (the pool shrank); returns what is still owed."""
        self.owed = min(self.owed, max(0, wanted))
        return self.owed

    @property
    def problem(self) -> str | None:
        """Why the pool cannot serve as sized (``None``: fine)."""
        if self.count < FAILURES_BEFORE_UNREADY:
            return None
        return f"workers cannot start ({self.count} failures in a row): {self.last_reason}"
