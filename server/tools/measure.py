"""The measurement model of ``stoker demo`` and ``stoker bench``: timed windows over a batch stream,
a loader's series of windows reported by its median one, and the CPU time and memory of a process tree.

A loader is timed in several windows of the same length, one after another; it is reported by the
window with the median images/s, and every figure shown for it (images, MB/s, CPU, stall) comes from
that one window, so the figures of a row always belong together.
"""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Run", "Series", "Stream", "cpu_seconds", "memory_mb", "process_tree", "timed_window"]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as handle:
            children += [int(child) for child in handle.read().split()]
    return children


def process_tree(pid: int) -> Iterator[int]:
    """``pid`` and its live descendants, each parent before its children (Linux ``/proc``).

    A process that exits during the walk is left out with its subtree; callers reading its files
    must expect them to vanish too.
    """
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            children = _children(current)
        except (FileNotFoundError, ProcessLookupError):
            continue
        yield current
        pending += children


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of ``pid`` (default: this process) and its live descendants; without
    ``/proc``, this process and its reaped children."""
    pid = os.getpid() if pid is None else pid
    if not os.path.exists("/proc/self/stat"):
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    ticks = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/stat") as handle:
                # The command name may hold spaces and parentheses: split after its closing one.
                fields = handle.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return ticks / _TICKS


def memory_mb(pid: int, field: str = "Pss") -> float:
    """Memory of ``pid`` and its live descendants in MB, from ``smaps_rollup`` (Linux): ``Pss`` splits
    shared pages between the processes sharing them (torch loaded once in a forkserver is not counted
    per worker); ``Rss`` counts them in every process."""
    if field not in ("Pss", "Rss"):
        raise ValueError(f"{field=} must be 'Pss' or 'Rss'")
    total_kb = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/smaps_rollup") as handle:
                total_kb += sum(int(line.split()[1]) for line in handle if line.startswith(f"{field}:"))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total_kb / 1024


@dataclass(frozen=True)
class Run:
    """One timed window of one loader."""

    images: int
    nbytes: int
    wall_s: float
    cpu_s: float
    """CPU seconds of the measuring process and its descendants (loader workers, a local server)."""
    waited_s: float | None = None
    """Seconds the consumer waited for data, where the loader counts it (stoker's client does)."""

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / self.wall_s / 1e6 if self.wall_s > 0 else 0.0

    @property
    def cpu_s_per_1000(self) -> float:
        return 1000 * self.cpu_s / self.images if self.images else 0.0

    @property
    def stall_share(self) -> float | None:
        """The share of the window spent waiting for data, or None where it was not counted."""
        if self.waited_s is None or self.wall_s <= 0:
            return None
        return min(1.0, self.waited_s / self.wall_s)


@dataclass
class Series:
    """Every run of one loader, reported by its median run.

    A short window is mostly start-up noise (first requests, thread pools, page faults); the median
    of a few is what a longer run sees, and the spread shows how much the windows disagreed.
    """

    label: str
    runs: list[Run] = field(default_factory=list)
    note: str = ""

    def median(self) -> Run:
        """The run with the median images/s (the lower middle one for an even count)."""
        if not self.runs:
            raise ValueError(f"{self.label!r} has no runs")
        ranked = sorted(self.runs, key=lambda run: run.images_per_s)
        return ranked[(len(ranked) - 1) // 2]

    def spread(self) -> tuple[float, float]:
        """The lowest and highest images/s of the runs."""
        if not self.runs:
            raise ValueError(f"{self.label!r} has no runs")
        rates = [run.images_per_s for run in self.runs]
        return min(rates), max(rates)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the median run's figures, the spread and every run."""
        median = self.median()
        low, high = self.spread()
        return {
            "label": self.label,
            "images_per_s": {"median": median.images_per_s, "min": low, "max": high},
            "mb_per_s": median.mb_per_s,
            "cpu_s_per_1000_images": median.cpu_s_per_1000,
            "runs": [asdict(run) for run in self.runs],
            "note": self.note,
        }


@dataclass(frozen=True)
class Stream:
    """What a timed window consumes from a loader."""

    counts: Iterator[tuple[int, int]]
    """Endless ``(images, bytes)`` of each batch the consumer received."""
    batches_per_epoch: int
    waited_s: Callable[[], float] | None = None
    """The loader's running total of seconds the consumer waited, where it keeps one."""


def timed_window(
    stream: Stream,
    *,
    seconds: float | None = None,
    batches: int | None = None,
    warmup_batches: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> Run:
    """Skip ``warmup_batches``, then time batches until ``seconds`` have passed (the batch that
    crosses the line counts) or until ``batches`` have arrived; give exactly one of the two."""
    if (seconds is None) == (batches is None):
        raise ValueError(f"give exactly one of {seconds=} and {batches=}")
    if seconds is not None and not seconds > 0:
        raise ValueError(f"{seconds=} must be > 0")
    if batches is not None and batches < 1:
        raise ValueError(f"{batches=} must be >= 1")
    for _ in range(warmup_batches):
        next(stream.counts)
    waited_s = stream.waited_s
    waited_before = waited_s() if waited_s is not None else 0.0
    cpu_before = cpu_seconds()
    started = clock()
    deadline = started + seconds if seconds is not None else math.inf
    images = nbytes = count = 0
    while True:
        n, size = next(stream.counts)
        images, nbytes, count = images + n, nbytes + size, count + 1
        now = clock()
        if count == batches or now >= deadline:
            break
    cpu_s = cpu_seconds() - cpu_before
    waited = waited_s() - waited_before if waited_s is not None else None
    return Run(images, nbytes, now - started, cpu_s, waited)
