"""Timing helpers for ``stoker bench``: timed windows over a batch stream, CPU time of a process tree."""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["Run", "Row", "cpu_seconds", "timed_window"]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(root: int | None = None) -> float:
    """User + system CPU seconds of a process and all its live descendants (Linux /proc); elsewhere,
    this process and its reaped children."""
    root = os.getpid() if root is None else root
    if not os.path.exists(f"/proc/{root}/stat"):
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    total, pending = 0, [root]
    while pending:
        pid = pending.pop()
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as handle:
                    pending += [int(child) for child in handle.read().split()]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return total / _TICKS


@dataclass
class Run:
    """One timed window."""

    images: int
    nbytes: int
    wall_s: float
    cpu_s: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / self.wall_s / 1e6 if self.wall_s else 0.0

    @property
    def cpu_s_per_1000(self) -> float:
        return 1000 * self.cpu_s / self.images if self.images else 0.0


@dataclass
class Row:
    """A line of the table: every run of one loader."""

    key: str
    label: str
    runs: list[Run] = field(default_factory=list)
    note: str = ""

    def median(self, attribute: str) -> float:
        values = [getattr(run, attribute) for run in self.runs]
        return statistics.median(values) if values else 0.0

    def spread(self, attribute: str) -> tuple[float, float]:
        values = [getattr(run, attribute) for run in self.runs] or [0.0]
        return min(values), max(values)

    def as_dict(self) -> dict[str, object]:
        low, high = self.spread("images_per_s")
        return {
            "label": self.label,
            "images_per_s": {"median": self.median("images_per_s"), "min": low, "max": high},
            "mb_per_s": self.median("mb_per_s"),
            "cpu_s_per_1000_images": self.median("cpu_s_per_1000"),
            "runs": [vars(run) for run in self.runs],
            "note": self.note,
        }


def timed_window(batches: Iterator[tuple[int, int]], seconds: float, warmup_batches: int = 2) -> Run:
    """Consume ``(images, bytes)`` items: skip ``warmup_batches``, then count for ``seconds``."""
    for _ in range(warmup_batches):
        next(batches)
    images = nbytes = 0
    cpu_start, started = cpu_seconds(), time.perf_counter()
    deadline = started + seconds
    while True:
        count, size = next(batches)
        images += count
        nbytes += size
        now = time.perf_counter()
        if now >= deadline:
            break
    return Run(images, nbytes, now - started, cpu_seconds() - cpu_start)
