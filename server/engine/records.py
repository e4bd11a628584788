"""The engine's records: a batch in the making, the tasks cut from it, a finished batch, a send in
flight and a connected client. Plain data; the engine parts that own them change them.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from stoker.client.protocol.wire import ErrorCode
from stoker.server.engine.jobs import OpenJob
from stoker.server.engine.stats import PeerStats
from stoker.server.workers.slots import Slot

__all__ = ["BatchKey", "BatchFailure", "BatchWork", "Task", "CachedBatch", "PendingSend", "Peer", "where"]

BatchKey = tuple[str, int, int, int]
"""``(job_id, epoch, rank, k)``."""


def where(key: BatchKey) -> dict[str, int]:
    """The batch coordinates an ``ERROR`` about ``key`` carries."""
    return {"epoch": key[1], "rank": key[2], "k": key[3]}


@dataclass(frozen=True, slots=True)
class BatchFailure:
    """Why a batch cannot be produced: the ``ERROR`` its waiters get."""

    code: ErrorCode
    message: str
    details: dict[str, str] = field(default_factory=dict)
    """``path``, ``reason``, ``traceback``: whatever the failure knows."""

    def fields(self, key: BatchKey) -> dict[str, Any]:
        """The ``ERROR`` message's fields for batch ``key``."""
        return {"code": int(self.code), "message": self.message, **where(key), **self.details}


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
    """Rows not yet written."""
    slot: Slot | None = None
    tasks: set[Task] = field(default_factory=set)
    """Tasks of this batch queued for or held by a worker."""
    failure: BatchFailure | None = None
    created_at: float = field(default_factory=time.monotonic)
    dispatched_at: float = 0.0
    targets: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Row -> the small targets its worker sent (a stand-in's replace the bad sample's)."""

    @property
    def nbytes(self) -> int:
        """Bytes of the batch's images."""
        return self.job.batch_nbytes(self.key[3])

    @property
    def finished(self) -> bool:
        """No task out, and every row written or the batch given up."""
        return not self.tasks and (not self.pending or self.failure is not None)

    def fail(self, code: ErrorCode, message: str, **details: str) -> None:
        """Give up on this batch: waiters get an ``ERROR`` with ``code`` once no task is out."""
        if self.failure is None:
            self.failure = BatchFailure(code, message, details)
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
    """A finished batch, ready to send (again)."""

    slot: Slot
    header: bytes
    nbytes: int
    images: int
    mask_nbytes: int = 0
    """Bytes of the mask block after the images in the slot (sent as its own frame)."""
    targets: bytes | None = None
    """The targets frame (msgpack), sent last."""


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
