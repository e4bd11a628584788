"""The engine's configuration: frozen, validated, with units in the names."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from stoker.server.imaging.decode import DecodeLimits

__all__ = ["EngineConfig", "OnError", "usable_cores"]

OnError = Literal["skip", "raise"]


def usable_cores() -> int:
    """CPU cores this process may use: its affinity mask (cgroup cpusets), capped by a cgroup v2 CPU
    quota (``docker --cpus``, Kubernetes CPU limits), which the mask does not show."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything the data plane needs; built from the server settings at the process edge."""

    bind: str = "tcp://*:5555"
    workers: int = field(default_factory=usable_cores)
    max_workers: int = 1024
    """Upper bound for growing the pool live (``PATCH /config``)."""
    max_prefetch: int = 16
    """Most batches one client may have requested and not yet received."""
    on_error: OnError = "skip"
    """``skip``: replace a bad sample by another of the same epoch; ``raise``: fail the batch."""
    cache_batches: int = 8
    """Finished batches kept to answer repeated requests (retries, identical jobs) without decoding."""
    max_shm_bytes: int = 2 * 1024**3
    """Budget for shared-memory batch buffers."""
    max_batch_size: int = 4096
    max_image_size: int = 1024
    client_timeout_s: float = 120.0
    """A client silent this long is forgotten and its queued requests dropped."""
    drain_timeout_s: float = 10.0
    """On shutdown, how long in-flight batches may take to finish sending."""
    worker_start_timeout_s: float = 120.0
    task_timeout_s: float = 120.0
    """A worker on one task longer than this is killed (and the task redone elsewhere)."""
    worker_queue_depth: int = 2
    """Tasks queued per worker, so a worker never waits for the engine."""
    max_replacements: int = 64
    """Stand-ins tried for one bad sample before the batch fails."""
    heartbeat_ms: int = 2000
    limits: DecodeLimits = field(default_factory=DecodeLimits)

    LIVE = ("workers", "max_prefetch", "on_error", "cache_batches", "client_timeout_s")

    def with_changes(self, **changes: object) -> EngineConfig:
        """A validated copy with live fields changed; other fields cannot change while serving."""
        unknown = set(changes) - set(self.LIVE)
        if unknown:
            raise ValueError(f"cannot change {sorted(unknown)} live; changeable: {sorted(self.LIVE)}")
        return replace(self, **changes)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        checks = {
            "workers": (self.workers, 1, 1024),
            "max_workers": (self.max_workers, 1, 1024),
            "max_prefetch": (self.max_prefetch, 1, 1024),
            "cache_batches": (self.cache_batches, 0, 4096),
            "max_batch_size": (self.max_batch_size, 1, 16384),
            "max_image_size": (self.max_image_size, 8, 4096),
            "worker_queue_depth": (self.worker_queue_depth, 1, 64),
            "max_replacements": (self.max_replacements, 1, 100000),
            "heartbeat_ms": (self.heartbeat_ms, 10, 600000),
        }
        for name, (value, low, high) in checks.items():
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name}={value!r} must be an int in [{low}, {high}]")
        if self.workers > self.max_workers:
            raise ValueError(f"workers={self.workers} must be <= max_workers={self.max_workers}")
        if self.on_error not in ("skip", "raise"):
            raise ValueError(f"on_error={self.on_error!r} must be 'skip' or 'raise'")
        if self.max_shm_bytes < 1024**2:
            raise ValueError(f"max_shm_bytes={self.max_shm_bytes!r} must be at least 1 MiB")
        for name in ("client_timeout_s", "drain_timeout_s", "worker_start_timeout_s", "task_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}={value!r} must be > 0")
        if not self.bind.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(f"bind={self.bind!r} must be a ZeroMQ endpoint such as tcp://*:5555")
