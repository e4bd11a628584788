"""Demand, capacity and the size they call for (engine thread).

**Demand** is what the trainers would consume if never kept waiting: every ``REQUEST`` carries the
client's cumulative images handed to its loop, seconds waited for data and seconds iterated
(``images``, ``waited_s``, ``elapsed_s``); over a short window (``demand_window_s``) a client's
demand is the images it took per second *of its own computing* (elapsed minus waited). A client
spread over several servers asks this one for a share of it: the images this server sent it over the
same window, against the images it took.

**Capacity** is images per busy worker-second, per pipeline, from the task results of the same window.

From the two: ``desired_workers`` = the worker-seconds per second this server's share of the demand
needs, plus ``headroom`` (default 15 %), rounded up; ``desired_replicas`` = the same for every
client's whole demand (every trainer of a job lists every replica), over one replica's workers.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

__all__ = ["Report", "ClientRates", "ClientDemand", "Capacity", "Sizing", "Demand"]

_MIN_SPAN_S = 0.2
"""A window shorter than this says nothing yet."""
_DEFAULT_PIPELINE = ""


@dataclass(frozen=True, slots=True)
class Report:
    """What one request said about its client, and what this server had sent it by then."""

    at: float
    images: int
    waited_s: float
    elapsed_s: float
    served: int

    def __post_init__(self) -> None:
        if self.images < 0 or self.waited_s < 0 or self.elapsed_s < 0 or self.served < 0:
            raise ValueError(f"a report's figures are counts and durations, never negative: {self}")


@dataclass(frozen=True, slots=True)
class ClientRates:
    """One client over the window."""

    demand: float
    """Images/s its loop would take if never kept waiting."""
    consumed: float
    """Images/s its loop took."""
    stall_share: float
    """Share of its loop spent waiting for data."""
    here: float
    """Share of its images this server sent (1 with one server)."""
    span_s: float
    """Seconds of the client's loop the window covers."""


class ClientDemand:
    """One client's reports over the window (the newest report older than the window kept as its start)."""

    def __init__(self, job_id: str, pipeline: str) -> None:
        self.job_id = job_id
        self.pipeline = pipeline
        self._reports: deque[Report] = deque()

    def add(self, report: Report, window_s: float) -> None:
        """Record a report; drop what the window no longer needs."""
        if self._reports and report.elapsed_s < self._reports[-1].elapsed_s:
            self._reports.clear()  # the client restarted its figures (a new process behind one name)
        self._reports.append(report)
        start = report.at - window_s
        while len(self._reports) > 2 and self._reports[1].at <= start:
            self._reports.popleft()

    def rates(self) -> ClientRates | None:
        """The client's rates over the window; ``None`` until it spans enough of the loop."""
        if len(self._reports) < 2:
            return None
        first, last = self._reports[0], self._reports[-1]
        elapsed = last.elapsed_s - first.elapsed_s
        images = last.images - first.images
        if elapsed < _MIN_SPAN_S or images <= 0:
            return None
        waited = min(elapsed, max(0.0, last.waited_s - first.waited_s))
        # A loop that only waits computes for ~0 s: its demand is bounded by 1 ms of compute per window.
        computing = max(elapsed - waited, 1e-3)
        served = max(0, last.served - first.served)
        return ClientRates(
            demand=images / computing,
            consumed=images / elapsed,
            stall_share=waited / elapsed,
            here=min(1.0, served / images),
            span_s=elapsed,
        )


class Capacity:
    """Images per busy worker-second, per pipeline, over the window (running sums: read every tick)."""

    def __init__(self) -> None:
        self._done: dict[str, deque[tuple[float, int, float]]] = {}
        self._sums: dict[str, tuple[int, float]] = {}

    def add(self, pipeline: str, at: float, images: int, seconds: float) -> None:
        """A task of ``images`` samples took a worker ``seconds``."""
        if seconds > 0 and images > 0:
            self._done.setdefault(pipeline, deque()).append((at, images, seconds))
            total_images, total_seconds = self._sums.get(pipeline, (0, 0.0))
            self._sums[pipeline] = (total_images + images, total_seconds + seconds)

    def trim(self, now: float, window_s: float) -> None:
        """Forget results older than the window (the newest kept, so a quiet pipeline keeps a figure)."""
        for pipeline, done in self._done.items():
            total_images, total_seconds = self._sums[pipeline]
            while len(done) > 1 and done[0][0] < now - window_s:
                _, images, seconds = done.popleft()
                total_images, total_seconds = total_images - images, total_seconds - seconds
            self._sums[pipeline] = (total_images, total_seconds)

    def by_pipeline(self) -> dict[str, float]:
        """Images per busy worker-second of each pipeline measured."""
        return {name: i / s for name, (i, s) in self._sums.items() if s > 1e-9}

    def per_worker(self, pipeline: str | None = None) -> float | None:
        """Images per busy worker-second of ``pipeline`` (``None``: every pipeline), if measured."""
        sums = self._sums.values() if pipeline is None else [self._sums.get(pipeline, (0, 0.0))]
        images = sum(i for i, _ in sums)
        seconds = sum(s for _, s in sums)
        return images / seconds if seconds > 1e-9 else None


@dataclass(frozen=True, slots=True)
class Sizing:
    """What the window says: demand, capacity and the sizes they call for (``None``: not measured yet)."""

    demand_ips: float
    """Images/s this server's clients would take from it if never kept waiting."""
    fleet_demand_ips: float
    """Images/s every client would take from the whole fleet."""
    capacity_ips: float | None
    """Images/s one busy worker renders (over every pipeline)."""
    desired_workers: int | None
    desired_replicas: int | None


class Demand:
    """Every client's window and the workers' capacity: the engine feeds it, ``/status`` reads it."""

    def __init__(self, window_s: float, headroom: float) -> None:
        if window_s <= 0 or headroom < 0:
            raise ValueError(f"{window_s=} must be > 0 and {headroom=} >= 0")
        self.window_s = window_s
        self.headroom = headroom
        self.capacity = Capacity()
        self._clients: dict[bytes, ClientDemand] = {}

    def report(self, identity: bytes, job_id: str, pipeline: str, report: Report) -> None:
        """A request's figures (clients that send none are not counted: older clients)."""
        client = self._clients.get(identity)
        if client is None or client.job_id != job_id:
            client = self._clients[identity] = ClientDemand(job_id, pipeline)
        client.add(report, self.window_s)

    def forget(self, identity: bytes) -> None:
        """The client is gone: its demand with it."""
        self._clients.pop(identity, None)

    def task_done(self, pipeline: str, at: float, images: int, seconds: float) -> None:
        """A worker spent ``seconds`` on ``images`` samples of ``pipeline``."""
        self.capacity.add(pipeline, at, images, seconds)

    def _rates(self, client: ClientDemand) -> ClientRates | None:
        # A client counts once its window covers half the span: its start-up wait no longer dominates.
        rates = client.rates()
        return rates if rates is not None and rates.span_s >= self.window_s / 2 else None

    def jobs(self) -> dict[str, list[ClientRates]]:
        """The rates of every measured client, by job."""
        found: dict[str, list[ClientRates]] = {}
        for client in self._clients.values():
            rates = self._rates(client)
            if rates is not None:
                found.setdefault(client.job_id, []).append(rates)
        return found

    def sizing(self, now: float, replica_workers: int) -> Sizing:
        """The sizes the window calls for; a replica runs ``replica_workers`` workers."""
        self.capacity.trim(now, self.window_s)
        here = fleet = need_here = need_fleet = 0.0
        measured = True
        for client in self._clients.values():
            rates = self._rates(client)
            if rates is None:
                continue
            per_worker = self.capacity.per_worker(client.pipeline) or self.capacity.per_worker()
            here += rates.demand * rates.here
            fleet += rates.demand
            if per_worker is None:
                measured = False
                continue
            need_here += rates.demand * rates.here / per_worker
            need_fleet += rates.demand / per_worker
        capacity = self.capacity.per_worker()
        if not measured:
            return Sizing(here, fleet, capacity, None, None)
        grown = 1.0 + self.headroom
        return Sizing(
            demand_ips=here,
            fleet_demand_ips=fleet,
            capacity_ips=capacity,
            desired_workers=_size(need_here * grown),
            desired_replicas=_size(need_fleet * grown / max(1, replica_workers)),
        )


def _size(needed: float) -> int:
    """Whole units for ``needed`` (at least one; a hair over a whole number does not add one)."""
    return max(1, math.ceil(needed - 1e-6))
