"""Running by demand (engine thread): the engine's one handle on demand, capacity, fair shares,
autoscaling and verdicts, so that the engine's loop calls four methods and knows none of the policy.

- :meth:`Fleet.requested`: a request's figures (demand window, asked weight).
- :meth:`Fleet.measured`: a worker's result (capacity; the fair queue charges in production).
- :meth:`Fleet.forget`: a client left.
- :meth:`Fleet.tick`: every housekeeping turn: the sizes, the gauges, and the autoscaler's resize.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

from stoker.server.data.catalog import Catalog
from stoker.server.engine.autoscale import Autoscaler
from stoker.server.engine.demand import ClientRates, Demand, Report, Sizing
from stoker.server.engine.fairness import FairQueue, Weights
from stoker.server.engine.jobs import OpenJob
from stoker.server.engine.records import Peer
from stoker.server.engine.requests import BatchRequest
from stoker.server.engine.stats import EngineStats
from stoker.server.engine.verdict import Signals, Verdict, judge
from stoker.server.settings.model import EngineSettings
from stoker.server.workers.pool import PoolEvent, TaskDone, WorkerPool

__all__ = ["Fleet", "JobFigures"]


@dataclass(frozen=True, slots=True)
class JobFigures:
    """One job over the window, for ``/status``."""

    weight: float
    share: float
    images_per_s: float
    demand_images_per_s: float | None
    stall_share: float | None
    verdict: Verdict | None


class Fleet:
    """Demand, capacity, weights, the fair queue and the autoscaler of one server."""

    def __init__(self, config: EngineSettings, catalog: Catalog) -> None:
        declared = {entry.decl.name: entry.decl.weight for entry in catalog.entries}
        declared.update({name: mixture.weight for name, mixture in catalog.mixtures.items()})
        self.weights = Weights(declared)
        """Declared weights of datasets and mixtures (a mixture job's spec names its mixture)."""
        self.fair = FairQueue(self.weights, config.demand_window_s)
        self.demand = Demand(config.demand_window_s, config.demand_headroom)
        bounds = config.autoscale_bounds
        self.autoscaler = Autoscaler(bounds[0], bounds[1], config.autoscale_interval_s) if bounds else None
        self.sizing = Sizing(0.0, 0.0, None, None, None)
        self._busy_at: tuple[float, float] | None = None
        self.resizes: deque[tuple[float, int, int]] = deque(maxlen=20)
        """``(unix time, from, to)`` of the autoscaler's recent resizes."""
        self.busy_share = 0.0
        """Share of the pool's worker time spent on tasks since the last tick but one (smoothed)."""

    def requested(self, identity: bytes, peer: Peer, request: BatchRequest, now: float) -> None:
        """Record what a request says about its client's loop and weight."""
        self.weights.ask(request.job.job_id, request.weight)
        if request.images is None or request.waited_s is None or request.elapsed_s is None:
            return  # an older client: no demand figures
        report = Report(now, request.images, request.waited_s, request.elapsed_s, peer.stats.images)
        self.demand.report(identity, request.job.job_id, request.job.pipeline.name, report)

    def measured(self, event: PoolEvent) -> None:
        """A worker's result: its images per busy second."""
        if isinstance(event, TaskDone):
            task = event.task
            self.demand.task_done(task.work.job.pipeline.name, time.monotonic(), len(task.samples), event.seconds)

    def forget(self, identity: bytes) -> None:
        """A client left."""
        self.demand.forget(identity)

    def max_workers(self, config: EngineSettings) -> int:
        """The most workers this server may run."""
        if self.autoscaler is not None:
            return self.autoscaler.high
        return config.max_workers or config.workers

    def tick(self, pool: WorkerPool, config: EngineSettings, stats: EngineStats) -> int | None:
        """Update the sizes and gauges; returns the pool size the autoscaler wants now (``None``: keep)."""
        now = time.monotonic()
        busy_s = sum(w.busy_s + (now - w.task_started_at if w.task_started_at else 0.0) for w in pool.workers)
        if self._busy_at is not None and now > self._busy_at[0]:
            span = now - self._busy_at[0]
            share = max(0.0, busy_s - self._busy_at[1]) / (span * max(1, len(pool.workers)))
            # Smoothed over about the demand window (ticks come every ~0.5 s).
            alpha = min(1.0, span / self.demand.window_s * 2)
            self.busy_share = min(1.0, self.busy_share + alpha * (share - self.busy_share))
        self._busy_at = (now, busy_s)
        sizing = self.resize_view(pool)
        stats.demand_ips.set(sizing.demand_ips)
        stats.capacity_ips.set(sizing.capacity_ips or 0.0)
        stats.desired_workers.set(sizing.desired_workers if sizing.desired_workers is not None else pool.target_size)
        stats.desired_replicas.set(sizing.desired_replicas if sizing.desired_replicas is not None else 1)
        if self.autoscaler is None:
            return None
        # The workers the in-flight work keeps busy (over the window: a tick right after a dispatch
        # finds every worker holding a row of the same small batch).
        busy = math.ceil(self.busy_share * pool.target_size - 0.05)
        size = self.autoscaler.decide(now, pool.target_size, sizing.desired_workers, busy)
        if size is not None:
            self.resizes.append((time.time(), pool.target_size, size))
        return size

    def resize_view(self, pool: WorkerPool) -> Sizing:
        """The sizes the window calls for now (kept in :attr:`sizing` for ``/status``)."""
        replica_workers = self.autoscaler.high if self.autoscaler is not None else pool.target_size
        self.sizing = self.demand.sizing(time.monotonic(), replica_workers)
        return self.sizing

    def job(self, job: OpenJob, config: EngineSettings, stats: EngineStats, workers: int) -> JobFigures:
        """One job's weight, share, rates and verdict."""
        now = time.monotonic()
        rates: list[ClientRates] = self.demand.jobs().get(job.job_id, [])
        stall = sum(r.stall_share for r in rates) / len(rates) if rates else None
        consumed = sum(r.consumed * r.here for r in rates)
        demand = sum(r.demand * r.here for r in rates) if rates else None
        stages = stats.stages
        read = stages["read"].mean_s()
        work = read + stages["decode"].mean_s() + stages["augment"].mean_s()
        _, bytes_s = stats.throughput.rates(now)
        signals = Signals(
            stall_share=stall,
            busy_share=self.busy_share,
            workers=workers,
            max_workers=self.max_workers(config),
            desired_workers=self.sizing.desired_workers,
            read_ms=1000 * read,
            work_ms=1000 * work,
            send_ms=1000 * stages["send"].mean_s(),
            latency_ms=1000 * stats.latency.mean_s(),
            mb_per_s=bytes_s / 1e6,
        )
        return JobFigures(
            weight=self.weights.of(job),
            share=self.fair.shares(now).get(job.job_id, 0.0),
            images_per_s=consumed,
            demand_images_per_s=demand,
            stall_share=stall,
            verdict=judge(signals),
        )
