"""The engine's read API: the ``/status`` snapshot and the Prometheus gauges, built on the engine
thread from the parts' public views (the HTTP side asks for them through ``Engine.call``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from stoker.server.data.jobs import OpenJob
from stoker.server.engine.records import Peer
from stoker.server.version import VERSION
from stoker.server.workers.pool import WorkerHandle

if TYPE_CHECKING:
    from stoker.server.engine.engine import Engine

__all__ = ["build_snapshot", "update_gauges"]


def worker_view(worker: WorkerHandle[Any]) -> dict[str, Any]:
    """One worker: pid, tasks held and the file it is decoding now."""
    current = None
    position = int(worker.progress.value)
    if worker.tasks and 0 <= position < len(worker.tasks[0].samples):
        task = worker.tasks[0]
        current = task.work.job.table.display_path(task.samples[position][1])
    return {
        "id": worker.worker_id,
        "pid": worker.process.pid,
        "tasks": len(worker.tasks),
        "current": current,
        "retiring": worker.retiring,
        "busy_s": round(worker.busy_s, 3),
    }


def client_view(peer: Peer, now: float) -> dict[str, Any]:
    """One connected client: position, traffic, window and reported stall share."""
    p = peer.stats
    images_s, bytes_s = p.throughput.rates(now)
    return {
        "client_id": p.client_id,
        "job_id": p.job_id,
        "rank": p.rank,
        "world_size": p.world_size,
        "epoch": p.epoch,
        "batches": p.batches,
        "images": p.images,
        "bytes": p.bytes,
        "inflight": len(peer.inflight),
        "images_per_s": round(images_s, 1),
        "mb_per_s": round(bytes_s / 1e6, 2),
        "stall_share": None if p.stall_share is None else round(p.stall_share, 4),
        "last_seen_s": round(now - p.last_seen, 2),
    }


def pool_view(engine: Engine) -> dict[str, Any]:
    """The worker pool: target size, who is alive and busy, restarts, each worker."""
    workers = engine.pool.workers
    return {
        "size": engine.pool.target_size,
        "alive": sum(1 for w in workers if w.process.is_alive()),
        "busy": sum(1 for w in workers if w.tasks),
        "restarts": engine.pool.restarts,
        "workers": [worker_view(w) for w in workers],
    }


def job_view(job: OpenJob) -> dict[str, Any]:
    """One open job."""
    spec = job.spec
    return {
        "job_id": job.job_id,
        "dataset": spec.dataset,
        "pipeline": spec.pipeline,
        "image_size": spec.image_size,
        "batch_size": spec.batch_size,
        "world_size": spec.world_size,
        "batches_per_rank": job.batches,
    }


def build_snapshot(engine: Engine) -> dict[str, Any]:
    """Everything ``/status`` shows except the HTTP address and the log level (the app adds those)."""
    now = time.monotonic()
    stats = engine.stats
    images_s, bytes_s = stats.throughput.rates(now)
    clients = [client_view(peer, now) for peer in engine.admission.peers]
    stalls = [c["stall_share"] for c in clients if c["stall_share"] is not None]
    return {
        "version": VERSION,
        "uptime_s": round(time.time() - stats.started_at, 1),
        "endpoints": {"data": engine.endpoint},
        "ready": engine.ready,
        "pool": pool_view(engine),
        "datasets": [entry.view() for entry in engine.catalog.entries],
        "jobs": [job_view(job) for job in engine.jobs.open_jobs],
        "pipelines": [pipeline.describe() for pipeline in engine.pipelines.values()],
        "cache": engine.cache.view(),
        "security": security_view(engine),
        "pipeline_errors": list(reversed(stats.pipeline_errors)),
        "clients": clients,
        "throughput": {"images_per_s": round(images_s, 1), "mb_per_s": round(bytes_s / 1e6, 2)},
        "stall_share": round(sum(stalls) / len(stalls), 4) if stalls else None,
        "stages": stats.stage_summary(),
        "latency": stats.latency.summary(),
        "inflight_batches": engine.inflight_batches,
        "shm_bytes": engine.slots.total_bytes,
        "errors": dict(stats.errors),
        "bad_samples": {
            "count": len(engine.bad),
            "recent": [
                {"dataset": b.dataset, "index": b.index, "path": b.path, "reason": b.reason, "at": b.at}
                for b in reversed(engine.bad.recent)
            ],
        },
        "config": {name: getattr(engine.config, name) for name in engine.config.live_fields},
    }


def security_view(engine: Engine) -> dict[str, Any]:
    """Whether the data plane needs CURVE keys, how many clients are authorised and refusals so far."""
    access = engine.access
    if access is None:
        return {"curve": False, "authorized_clients": None, "refused": {}}
    return {"curve": True, "authorized_clients": access.authorised, "refused": dict(access.refused)}


def update_gauges(engine: Engine) -> None:
    """Refresh the Prometheus gauges from the engine's current state."""
    stats, workers = engine.stats, engine.pool.workers
    stats.workers_gauge.set(len(workers))
    stats.busy_gauge.set(sum(1 for w in workers if w.tasks))
    stats.clients_gauge.set(len(list(engine.admission.peers)))
    stats.inflight_gauge.set(engine.admission.inflight)
    cache = engine.cache.view()
    stats.cache_budget.set(cache["budget_bytes"])
    stats.cache_used.set(cache["used_bytes"])
    stats.cache_entries.set(cache["entries"])
    stats.cache_hits.set(cache["hits"])
    stats.cache_misses.set(cache["misses"])
    stats.cache_decodes.set(cache["decodes_per_sample"] or 0.0)
    if engine.access is not None:
        stats.authorized_clients.set(engine.access.authorised)
        for reason, count in engine.access.refused.items():
            stats.refused_connections.labels(reason).set(count)
