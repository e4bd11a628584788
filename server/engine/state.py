"""The engine's read API: the ``/status`` document (:class:`~.status_models.Status`) and the Prometheus
gauges, built on the engine thread from its parts' attributes (the HTTP side asks for the document
through ``Engine.call``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from stoker.server.data.catalog import DatasetEntry
from stoker.server.engine.jobs import OpenJob
from stoker.server.engine.records import Peer
from stoker.server.engine.status_models import (
    BadSamples,
    BadSampleStatus,
    CacheStatus,
    ClientStatus,
    DatasetStatus,
    Endpoints,
    FleetStatus,
    JobStatus,
    MixtureSourceStatus,
    PipelineStatus,
    PoolStatus,
    ResizeStatus,
    SecurityStatus,
    Status,
    Throughput,
    WorkerStatus,
)
from stoker.server.settings.live import LiveConfig
from stoker.server.version import VERSION
from stoker.server.workers.pool import WorkerHandle

if TYPE_CHECKING:
    from stoker.server.engine.engine import Engine

__all__ = ["build_status", "update_gauges"]


def worker_status(worker: WorkerHandle[Any]) -> WorkerStatus:
    """One worker: pid, tasks held and the file it is decoding now."""
    current = None
    position = int(worker.progress.value)
    if worker.tasks and 0 <= position < len(worker.tasks[0].samples):
        task = worker.tasks[0]
        current = task.work.job.table.display_path(task.samples[position][1])
    return WorkerStatus(
        id=worker.worker_id,
        pid=worker.process.pid,
        tasks=len(worker.tasks),
        current=current,
        retiring=worker.retiring,
        busy_s=round(worker.busy_s, 3),
    )


def client_status(peer: Peer, now: float) -> ClientStatus:
    """One connected client: position, traffic, window and reported stall share."""
    p = peer.stats
    images_s, bytes_s = p.throughput.rates(now)
    return ClientStatus(
        client_id=p.client_id,
        job_id=p.job_id,
        rank=p.rank,
        world_size=p.world_size,
        epoch=p.epoch,
        batches=p.batches,
        images=p.images,
        bytes=p.bytes,
        inflight=len(peer.inflight),
        images_per_s=round(images_s, 1),
        mb_per_s=round(bytes_s / 1e6, 2),
        stall_share=None if p.stall_share is None else round(p.stall_share, 4),
        last_seen_s=round(now - p.last_seen, 2),
    )


def pool_status(engine: Engine) -> PoolStatus:
    """The worker pool: target size, who is alive and busy, restarts, start failures, each worker."""
    pool = engine.pool
    return PoolStatus(
        size=pool.target_size,
        alive=sum(1 for w in pool.workers if w.process.is_alive()),
        busy=sum(1 for w in pool.workers if w.tasks),
        restarts=pool.restarts,
        start_failures=pool.start_failures,
        problem=pool.problem,
        workers=[worker_status(w) for w in pool.workers],
    )


def dataset_status(entry: DatasetEntry) -> DatasetStatus:
    """One declared dataset: its state, size and source; a failed one with its error and traceback."""
    table = entry.table
    return DatasetStatus(
        name=entry.decl.name,
        state=entry.state,
        samples=len(table) if table is not None else entry.listed,
        classes=len(table.classes) if table is not None else 0,
        fingerprint=table.fingerprint if table is not None else "",
        source=entry.decl.resolved().kind,
        from_cache=entry.from_cache,
        seconds=round(entry.seconds, 3),
        error=entry.error,
        traceback=entry.traceback,
    )


def job_status(job: OpenJob, engine: Engine | None = None) -> JobStatus:
    """One open job (with ``engine``: its weight, share, rates and verdict)."""
    spec = job.spec
    figures = {}
    if engine is not None:
        f = engine.fleet.job(job, engine.config, engine.stats, engine.pool.target_size)
        figures = dict(
            weight=f.weight,
            share=round(f.share, 4),
            images_per_s=round(f.images_per_s, 1),
            demand_images_per_s=None if f.demand_images_per_s is None else round(f.demand_images_per_s, 1),
            stall_share=None if f.stall_share is None else round(f.stall_share, 4),
            verdict=f.verdict.kind if f.verdict else None,
            advice=f.verdict.advice if f.verdict else None,
        )
    return JobStatus(
        job_id=job.job_id,
        dataset=spec.dataset,
        pipeline=spec.pipeline,
        image_size=spec.image_size,
        batch_size=spec.batch_size,
        world_size=spec.world_size,
        batches_per_rank=job.batches,
        **figures,
    )


def fleet_status(engine: Engine) -> FleetStatus:
    """Demand, capacity and the sizes they call for."""
    fleet, config = engine.fleet, engine.config
    sizing = fleet.sizing
    return FleetStatus(
        desired_workers=sizing.desired_workers,
        desired_replicas=sizing.desired_replicas,
        demand_images_per_s=round(sizing.demand_ips, 1),
        fleet_demand_images_per_s=round(sizing.fleet_demand_ips, 1),
        capacity_images_per_s=None if sizing.capacity_ips is None else round(sizing.capacity_ips, 1),
        capacity_by_pipeline={name: round(v, 1) for name, v in fleet.demand.capacity.by_pipeline().items()},
        busy_share=round(fleet.busy_share, 4),
        headroom=config.demand_headroom,
        window_s=config.demand_window_s,
        autoscale=config.autoscale_workers,
        resizes=[ResizeStatus(at=at, workers_from=a, workers_to=b) for at, a, b in fleet.resizes],
    )


def cache_status(engine: Engine) -> CacheStatus:
    """The decoded-sample cache's budget, use and effect."""
    cache = engine.cache
    return CacheStatus(
        budget_bytes=cache.budget_bytes,
        used_bytes=cache.used_bytes,
        entries=cache.entries,
        copies=cache.copies,
        hits=cache.hits,
        misses=cache.misses,
        decodes_per_sample=cache.decodes_per_sample,
        datasets=sorted(cache.datasets),
    )


def security_status(engine: Engine) -> SecurityStatus:
    """Whether the data plane needs CURVE keys, how many clients are authorised and refusals so far."""
    access = engine.access
    if access is None:
        return SecurityStatus(curve=False, authorized_clients=None, refused={})
    return SecurityStatus(curve=True, authorized_clients=access.authorised, refused=dict(access.refused))


def build_status(engine: Engine, http_url: str = "", log_level: str = "INFO") -> Status:
    """Everything ``/status`` shows (run on the engine thread)."""
    now = time.monotonic()
    stats = engine.stats
    engine.fleet.resize_view(engine.pool)  # the verdicts below and the sizes agree
    images_s, bytes_s = stats.throughput.rates(now)
    clients = [client_status(peer, now) for peer in engine.admission.peers]
    stalls = [c.stall_share for c in clients if c.stall_share is not None]
    live = {name: getattr(engine.config, name) for name in engine.config.live_fields}
    return Status(
        version=VERSION,
        uptime_s=round(time.time() - stats.started_at, 1),
        endpoints=Endpoints(data=engine.endpoint, http=http_url),
        ready=engine.ready,
        pool=pool_status(engine),
        datasets=[dataset_status(entry) for entry in engine.catalog.entries],
        jobs=[job_status(job, engine) for job in engine.jobs.open_jobs],
        mixtures=[
            MixtureSourceStatus(
                mixture=p.mixture,
                source=p.source,
                weight=round(p.weight, 6),
                served_epoch=p.served_epoch,
                pass_number=p.pass_,
                position=p.position,
            )
            for p in stats.mixtures.sources()
        ],
        pipelines=[PipelineStatus(**pipeline.describe()) for pipeline in engine.pipelines.values()],
        cache=cache_status(engine),
        security=security_status(engine),
        pipeline_errors=list(reversed(stats.pipeline_errors)),
        clients=clients,
        throughput=Throughput(images_per_s=round(images_s, 1), mb_per_s=round(bytes_s / 1e6, 2)),
        stall_share=round(sum(stalls) / len(stalls), 4) if stalls else None,
        stages=stats.stage_summary(),
        latency=stats.latency.summary(),
        inflight_batches=engine.inflight_batches,
        shm_bytes=engine.slots.total_bytes,
        errors=dict(stats.errors),
        bad_samples=BadSamples(
            count=len(engine.bad),
            recent=[
                BadSampleStatus(dataset=b.dataset, index=b.index, path=b.path, reason=b.reason, at=b.at)
                for b in reversed(engine.bad.recent)
            ],
        ),
        config=LiveConfig(**live, log_level=log_level),
        desired_workers=engine.fleet.sizing.desired_workers,
        desired_replicas=engine.fleet.sizing.desired_replicas,
        fleet=fleet_status(engine),
    )


def update_gauges(engine: Engine) -> None:
    """Refresh the Prometheus gauges from the engine's current state."""
    stats, workers, cache = engine.stats, engine.pool.workers, engine.cache
    stats.workers_gauge.set(len(workers))
    stats.busy_gauge.set(sum(1 for w in workers if w.tasks))
    stats.clients_gauge.set(len(list(engine.admission.peers)))
    stats.inflight_gauge.set(engine.admission.inflight)
    stats.cache_budget.set(cache.budget_bytes)
    stats.cache_used.set(cache.used_bytes)
    stats.cache_entries.set(cache.entries)
    stats.cache_hits.set(cache.hits)
    stats.cache_misses.set(cache.misses)
    stats.cache_decodes.set(cache.decodes_per_sample or 0.0)
    for p in stats.mixtures.sources():
        stats.mixture_weight.labels(p.mixture, p.source).set(p.weight)
        stats.mixture_served.labels(p.mixture, p.source).set(p.served_epoch)
        stats.mixture_pass.labels(p.mixture, p.source).set(p.pass_)
        stats.mixture_position.labels(p.mixture, p.source).set(p.position)
    if engine.access is not None:
        stats.authorized_clients.set(engine.access.authorised)
        for reason, count in engine.access.refused.items():
            stats.refused_connections.labels(reason).set(count)
