"""Batches in the making: the engine's records of work, tasks, finished batches, sends and clients,
and the planner that turns a request into rows (with stand-ins for known bad samples).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from stoker.client.protocol.wire import ErrorCode
from stoker.server.data.jobs import JobRegistry, OpenJob, replacement_candidate
from stoker.server.engine.config import OnError
from stoker.server.engine.stats import BadSample, BadSamples, EngineStats, PeerStats
from stoker.server.workers.slots import Slot

__all__ = ["BatchKey", "BatchWork", "Task", "CachedBatch", "PendingSend", "Peer", "BatchPlanner"]

log = logging.getLogger(__name__)

BatchKey = tuple[str, int, int, int]
"""``(job_id, epoch, rank, k)``."""


@dataclass(eq=False)
class BatchWork:
    """A batch being produced, and who is waiting for it."""

    key: BatchKey
    job: OpenJob
    indices: np.ndarray
    """Dataset index per row, after bad-sample replacement."""
    originals: np.ndarray
    """Dataset index per row as planned; replacements are derived from it."""
    attempts: dict[int, int]
    waiters: dict[bytes, float]
    """Routing identity -> when it asked."""
    pending: set[int]
    slot: Slot | None = None
    tasks_out: int = 0
    failure: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.monotonic)
    dispatched_at: float = 0.0

    @property
    def nbytes(self) -> int:
        """Bytes of the batch's images."""
        return self.job.batch_nbytes(self.key[3])

    def fail(self, code: ErrorCode, message: str, **details: str) -> None:
        """Give up on this batch: waiters get an ``ERROR`` with ``code`` once no task is out."""
        self.failure = {"code": int(code), "message": message, **details}
        self.pending.clear()


@dataclass(eq=False)
class Task:
    """Some rows of one batch, as given to one worker."""

    task_id: int
    work: BatchWork
    samples: list[tuple[int, int]]
    """``(row, dataset index)``."""


@dataclass(frozen=True, slots=True)
class CachedBatch:
    """A finished batch kept for repeated requests."""

    slot: Slot
    header: bytes
    nbytes: int
    images: int


@dataclass(slots=True)
class PendingSend:
    """A batch handed to ZeroMQ whose buffer is still in use."""

    tracker: zmq.MessageTracker
    slot: Slot
    identity: bytes
    key: BatchKey
    nbytes: int
    images: int
    requested_at: float
    started_at: float


@dataclass(eq=False)
class Peer:
    """Engine-side bookkeeping of one client connection."""

    stats: PeerStats
    inflight: set[BatchKey] = field(default_factory=set)
    """Batches requested and not yet fully handed to the kernel: the flow-control window."""
    deferred: deque[BatchKey] = field(default_factory=deque)
    """Requests parked while the window is full (a client may ask again before a send completes)."""


class BatchPlanner:
    """Plans batches and picks stand-ins for bad samples, deterministically.

    A bad sample's stand-in is the first usable candidate of a fixed sequence derived from
    ``(seed, epoch, original index)``. Known-bad candidates are skipped, so whether a file is found
    bad now or was known before, every server ends up with the same stand-in.
    """

    def __init__(self, jobs: JobRegistry, bad: BadSamples, stats: EngineStats) -> None:
        self.jobs = jobs
        self.bad = bad
        self.stats = stats

    def plan(self, job: OpenJob, key: BatchKey, on_error: OnError, max_replacements: int) -> BatchWork:
        """The work for batch ``key``, with known bad samples already replaced (or the work failed)."""
        _, epoch, rank, k = key
        originals = self.jobs.indices(job, epoch, rank, k)
        work = BatchWork(key, job, originals.copy(), originals, {}, {}, set(range(len(originals))))
        for row, index in enumerate(originals):
            known = self.bad.get(job.table.name, int(index))
            if known is not None:
                self.replace(work, row, known, on_error, max_replacements)
        return work

    def replace(self, work: BatchWork, row: int, bad: BadSample, on_error: OnError, max_replacements: int) -> bool:
        """Point ``row`` at the next usable stand-in; ``False`` (and the work failed) if none."""
        if on_error == "raise":
            work.fail(ErrorCode.BAD_SAMPLE, f"bad sample {bad.path}: {bad.reason}", path=bad.path, reason=bad.reason)
            return False
        job, epoch = work.job, work.key[1]
        table = job.table
        original = int(work.originals[row])
        attempt = work.attempts.get(row, -1) + 1
        while attempt < max_replacements:
            candidate = replacement_candidate(job.spec, epoch, original, attempt, len(table))
            if self.bad.get(table.name, candidate) is None:
                work.attempts[row] = attempt
                work.indices[row] = candidate
                return True
            attempt += 1
        work.fail(
            ErrorCode.BAD_SAMPLE,
            f"no usable stand-in for {bad.path} after {max_replacements} tries",
            path=bad.path,
            reason=bad.reason,
        )
        return False

    def record_bad(self, work: BatchWork, row: int, reason: str) -> BadSample:
        """Remember that ``row``'s current sample is bad; return its (first) record."""
        table = work.job.table
        index = int(work.indices[row])
        sample = BadSample(table.name, index, table.display_path(index), reason, time.time())
        if self.bad.add(sample):
            self.stats.bad_total.labels(table.name).inc()
            log.warning("bad sample %s (dataset %r, index %d): %s", sample.path, table.name, index, reason)
        return self.bad.get(table.name, index) or sample
