"""The verdict on a job's bottleneck: one line saying where the time goes and what to do (pure).

- ``trainer-bound``: the job's clients hardly wait for data (under :data:`STALL_LIMIT` of their loop);
  the loader's idle share says how much it could give more.
- ``network-bound``: clients wait, the workers have time to spare, and a batch's time is mostly its
  send (batches waiting on the link).
- ``storage-bound``: clients wait and reading a sample's bytes takes most of its time in a worker
  (reads in flight saturated, read latency dominating).
- ``loader-bound``: clients wait and the workers are the limit: add workers (up to the pool's cap),
  then replicas; the number comes from ``desired_workers``. With enough workers idle, the latency of
  each batch is the limit: add none, raise the clients' prefetch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Signals", "Verdict", "judge", "STALL_LIMIT"]

STALL_LIMIT = 0.10
"""Clients waiting less than this share of their loop are fed."""
_BUSY_LIMIT = 0.7
"""Workers busier than this are the limit, not the link."""
_DOMINANT = 0.5


@dataclass(frozen=True, slots=True)
class Signals:
    """What the engine measured over the window."""

    stall_share: float | None
    """The job's clients' mean share of their loop spent waiting (``None``: not reported yet)."""
    busy_share: float
    """Share of the pool's worker time spent on tasks (every job)."""
    workers: int
    """Workers now."""
    max_workers: int
    """Most workers this server may run (the autoscaling MAX or ``max_workers``)."""
    desired_workers: int | None
    read_ms: float
    """Mean read time per sample."""
    work_ms: float
    """Mean read + decode + augment time per sample."""
    send_ms: float
    """Mean time of a batch's send."""
    latency_ms: float
    """Mean time from a batch's request to its send completing."""
    mb_per_s: float
    """The job's clients' received MB/s."""

    def __post_init__(self) -> None:
        if self.workers < 0 or self.max_workers < 1 or not 0 <= self.busy_share <= 1.5:
            raise ValueError(f"signals out of range: {self}")


@dataclass(frozen=True, slots=True)
class Verdict:
    """The kind and its line."""

    kind: str
    """``trainer-bound``, ``loader-bound``, ``network-bound`` or ``storage-bound``."""
    advice: str
    add_workers: int = 0
    add_replicas: int = 0

    @property
    def line(self) -> str:
        """``kind: advice``."""
        return f"{self.kind}: {self.advice}"


def judge(s: Signals) -> Verdict | None:
    """The verdict (``None`` until the job's clients have reported a window)."""
    if s.stall_share is None:
        return None
    idle = max(0.0, 1.0 - s.busy_share)
    waiting = f"clients wait {s.stall_share:.0%} of their loop"
    if s.stall_share < STALL_LIMIT:
        return Verdict("trainer-bound", f"loader {idle:.0%} idle: the trainer is the bottleneck")
    if s.busy_share < _BUSY_LIMIT and s.latency_ms > 0 and s.send_ms >= _DOMINANT * s.latency_ms:
        return Verdict(
            "network-bound",
            f"{waiting}; batches wait on sends ({s.send_ms:.0f} of {s.latency_ms:.0f} ms per batch, "
            f"{s.mb_per_s:.0f} MB/s) while workers are {idle:.0%} idle: a faster link or a closer loader",
        )
    if s.work_ms > 0 and s.read_ms >= _DOMINANT * s.work_ms:
        return Verdict(
            "storage-bound",
            f"{waiting}; reads take {s.read_ms / s.work_ms:.0%} of a sample's time ({s.read_ms:.1f} ms): "
            "raise reads_in_flight, or cache the dataset",
        )
    wanted = s.desired_workers if s.desired_workers is not None else s.workers + 1
    if wanted <= s.workers and s.busy_share < _BUSY_LIMIT:
        # Enough workers, and idle ones: each batch's latency, not the rate, keeps the clients waiting.
        return Verdict(
            "loader-bound",
            f"add 0 workers: they are {idle:.0%} idle yet {waiting}; raise the clients' prefetch",
        )
    extra = max(1, wanted - s.workers)
    if s.workers + extra <= s.max_workers:
        return Verdict("loader-bound", f"add {extra} worker{'s' * (extra > 1)} ({waiting})", add_workers=extra)
    replicas = max(1, math.ceil((s.workers + extra) / max(1, s.max_workers)) - 1)
    return Verdict(
        "loader-bound",
        f"add {replicas} replica{'s' * (replicas > 1)} ({waiting}; this server is at its {s.max_workers} workers)",
        add_replicas=replicas,
    )
