"""What the engine measures: stage times, per-client traffic, bad samples and Prometheus metrics.

Everything here is written by the engine thread only; ``/status`` asks the engine thread for a
snapshot and ``/metrics`` reads the Prometheus registry (which is thread-safe), so no locks sit on the
data path. Metric labels are bounded: stage names, error codes and declared dataset names only.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stoker.server.engine.mixing import MixtureProgress
from stoker.server.engine.status_models import PipelineErrorStatus, StageStatus

__all__ = ["Window", "Throughput", "PeerStats", "BadSample", "BadSamples", "EngineStats", "STAGES"]

STAGES = ("read", "decode", "augment", "geometry", "postops", "batch", "queue", "send")
"""Stages always shown; per-op stages (``op:<pipeline>/<op>``) appear once an op has run."""
_STAGE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Window:
    """The most recent values of a duration, for a mean and a 95th percentile."""

    def __init__(self, maxlen: int = 1024) -> None:
        self._values: deque[float] = deque(maxlen=maxlen)

    def add(self, value: float) -> None:
        """Record one value in seconds."""
        self._values.append(value)

    def mean_s(self) -> float:
        """Mean of the window in seconds (0 when empty)."""
        return sum(self._values) / len(self._values) if self._values else 0.0

    def summary(self) -> StageStatus:
        """Mean, 95th percentile (ms) and count over the window."""
        if not self._values:
            return StageStatus(mean_ms=0.0, p95_ms=0.0, count=0)
        ordered = sorted(self._values)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        return StageStatus(
            mean_ms=round(1000 * sum(ordered) / len(ordered), 3), p95_ms=round(1000 * p95, 3), count=len(ordered)
        )


class Throughput:
    """Images and bytes over the last ``span_s`` seconds."""

    def __init__(self, span_s: float = 10.0) -> None:
        self.span_s = span_s
        self._events: deque[tuple[float, int, int]] = deque()
        self._first: float | None = None

    def add(self, now: float, images: int, nbytes: int) -> None:
        """Record a delivery."""
        if self._first is None:
            self._first = now
        self._events.append((now, images, nbytes))
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.span_s:
            self._events.popleft()

    def rates(self, now: float) -> tuple[float, float]:
        """``(images/s, bytes/s)`` over the span."""
        self._trim(now)
        images = sum(e[1] for e in self._events)
        nbytes = sum(e[2] for e in self._events)
        # Right after the first delivery, divide by the time observed, not the whole span.
        window = min(self.span_s, max(1.0, now - self._first)) if self._first is not None else self.span_s
        return images / window, nbytes / window


@dataclass(eq=False)
class PeerStats:
    """One connected client (one ZeroMQ connection)."""

    identity: bytes
    client_id: str = ""
    rank: int = 0
    world_size: int = 1
    job_id: str = ""
    epoch: int = 0
    batches: int = 0
    images: int = 0
    bytes: int = 0
    waited_s: float = 0.0
    elapsed_s: float = 0.0
    connected_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    throughput: Throughput = field(default_factory=Throughput)

    @property
    def stall_share(self) -> float | None:
        """The client's reported share of its loop spent waiting for data."""
        return self.waited_s / self.elapsed_s if self.elapsed_s > 0 else None


@dataclass(frozen=True, slots=True)
class BadSample:
    """A sample that could not be used, and why."""

    dataset: str
    index: int
    path: str
    reason: str
    at: float


class BadSamples:
    """Every bad sample by ``(dataset, index)``: decoded once, never again; the recent ones listed."""

    def __init__(self, recent: int = 100) -> None:
        self._known: dict[tuple[str, int], BadSample] = {}
        self.recent: deque[BadSample] = deque(maxlen=recent)

    def add(self, sample: BadSample) -> bool:
        """Record a bad sample; ``False`` if it was already known."""
        key = (sample.dataset, sample.index)
        if key in self._known:
            return False
        self._known[key] = sample
        self.recent.append(sample)
        return True

    def get(self, dataset: str, index: int) -> BadSample | None:
        """The record of a known bad sample."""
        return self._known.get((dataset, index))

    def __len__(self) -> int:
        return len(self._known)


class EngineStats:
    """Recent windows for ``/status`` plus the Prometheus registry for ``/metrics``."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self.stages = {stage: Window() for stage in STAGES}
        self.latency = Window()
        self.throughput = Throughput()
        self.errors: dict[str, int] = {}
        self.pipeline_errors: deque[PipelineErrorStatus] = deque(maxlen=100)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.images_total = Counter("stoker_images_served", "Images sent to clients", registry=r)
        self.batches_total = Counter("stoker_batches_served", "Batches sent to clients", registry=r)
        self.bytes_total = Counter("stoker_bytes_served", "Image bytes sent to clients", registry=r)
        self.samples_total = Counter(
            "stoker_samples_decoded", "Samples a worker attempted, by outcome", ["outcome"], registry=r
        )
        self.bad_total = Counter("stoker_bad_samples", "Samples refused as bad", ["dataset"], registry=r)
        self.pipeline_errors_total = Counter(
            "stoker_pipeline_errors", "Samples a post-op failed on, by pipeline", ["pipeline"], registry=r
        )
        self.restarts_total = Counter("stoker_worker_restarts", "Workers replaced after dying", registry=r)
        self.errors_total = Counter("stoker_errors", "ERROR replies sent, by code", ["code"], registry=r)
        self.stage_seconds = Histogram(
            "stoker_stage_seconds",
            "Time per stage (per sample for read/decode/augment, per batch otherwise)",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.latency_seconds = Histogram(
            "stoker_batch_latency_seconds",
            "From a batch's first request to its send completing",
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.workers_gauge = Gauge("stoker_workers", "Worker processes alive", registry=r)
        self.busy_gauge = Gauge("stoker_workers_busy", "Workers holding a task", registry=r)
        self.clients_gauge = Gauge("stoker_clients", "Connected clients", registry=r)
        self.inflight_gauge = Gauge("stoker_inflight_batches", "Batches requested and not yet delivered", registry=r)
        self.cache_budget = Gauge("stoker_cache_budget_bytes", "Decoded-sample cache budget", registry=r)
        self.cache_used = Gauge("stoker_cache_used_bytes", "Decoded-sample cache bytes written", registry=r)
        self.cache_entries = Gauge("stoker_cache_entries", "Samples held decoded", registry=r)
        # Gauges set from the engine's own counts at each housekeeping tick (one source of truth).
        self.cache_hits = Gauge("stoker_cache_hits", "Samples read decoded from the cache", registry=r)
        self.authorized_clients = Gauge(
            "stoker_authorized_clients", "Client keys the data socket authorises (CURVE)", registry=r
        )
        self.refused_connections = Gauge(
            "stoker_refused_connections",
            "Connections refused at the CURVE handshake, by reason (unknown_key, handshake)",
            ["reason"],
            registry=r,
        )
        self.cache_misses = Gauge("stoker_cache_misses", "Samples of cached datasets decoded", registry=r)
        # Running by demand (engine/demand.py): what the trainers ask for and the size it calls for.
        self.desired_workers = Gauge(
            "stoker_desired_workers", "Workers this server's share of the demand needs, with headroom", registry=r
        )
        self.desired_replicas = Gauge(
            "stoker_desired_replicas", "Loader replicas every client's demand needs, with headroom", registry=r
        )
        self.demand_ips = Gauge(
            "stoker_demand_images_per_second",
            "Images/s this server's clients would take if never kept waiting",
            registry=r,
        )
        self.capacity_ips = Gauge(
            "stoker_capacity_images_per_second", "Images/s one busy worker renders (measured)", registry=r
        )
        self.cache_decodes = Gauge(
            "stoker_cache_decodes_per_sample", "Mean decodes per sample of the cached datasets", registry=r
        )
        self.mixtures = MixtureProgress()
        """How far each mixture's jobs have got (see :mod:`stoker.server.engine.mixing`)."""
        source = ["mixture", "source"]
        self.mixture_weight = Gauge("stoker_mixture_weight", "A mixture source's weight now", source, registry=r)
        self.mixture_served = Gauge(
            "stoker_mixture_served_epoch", "Samples of a mixture source served this epoch", source, registry=r
        )
        self.mixture_pass = Gauge(
            "stoker_mixture_pass", "A mixture source's current pass (0-based)", source, registry=r
        )
        self.mixture_position = Gauge(
            "stoker_mixture_position", "A mixture source's position in its current pass", source, registry=r
        )

    def stage(self, name: str, seconds: float, count: int = 1) -> None:
        """Record ``count`` samples (or batches) that took ``seconds`` each on ``name``."""
        window = self.stages.get(name)
        if window is None:  # a post-op's stage: names come from declared pipelines only, so bounded
            window = self.stages[name] = Window()
        child = self.stage_seconds.labels(name)
        for _ in range(count):
            window.add(seconds)
            child.observe(seconds)

    def delivered(self, images: int, nbytes: int, latency_s: float) -> None:
        """A batch finished sending."""
        self.images_total.inc(images)
        self.batches_total.inc()
        self.bytes_total.inc(nbytes)
        self.latency.add(latency_s)
        self.latency_seconds.observe(latency_s)
        self.throughput.add(time.monotonic(), images, nbytes)

    def pipeline_failed(self, pipeline: str, op: str, path: str, reason: str) -> None:
        """A post-op failed on a sample (the batch fails with ``PIPELINE``)."""
        self.pipeline_errors.append(
            PipelineErrorStatus(pipeline=pipeline, op=op, path=path, reason=reason, at=time.time())
        )
        self.pipeline_errors_total.labels(pipeline).inc()

    def error(self, code_name: str) -> None:
        """An ERROR reply was sent."""
        self.errors[code_name] = self.errors.get(code_name, 0) + 1
        self.errors_total.labels(code_name).inc()

    def stage_summary(self) -> dict[str, StageStatus]:
        """Mean and p95 per stage."""
        return {stage: window.summary() for stage, window in self.stages.items()}
