"""The shape of ``/status``, declared once: pydantic models that the engine thread builds
(:mod:`.state`), the HTTP app serves and documents in its OpenAPI schema, and ``stoker status`` reads."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from stoker.server.settings.live import LiveConfig

__all__ = [
    "Status",
    "Endpoints",
    "WorkerStatus",
    "PoolStatus",
    "DatasetStatus",
    "JobStatus",
    "FleetStatus",
    "ResizeStatus",
    "PipelineStatus",
    "PipelineErrorStatus",
    "CacheStatus",
    "SecurityStatus",
    "ClientStatus",
    "StageStatus",
    "Throughput",
    "BadSampleStatus",
    "BadSamples",
]


class Endpoints(BaseModel):
    data: str = Field(description="ZeroMQ endpoint clients connect to")
    http: str = Field(description="this HTTP side")


class WorkerStatus(BaseModel):
    id: int
    pid: int | None
    tasks: int = Field(description="tasks held (one running, the rest queued)")
    current: str | None = Field(description="the file being decoded now")
    retiring: bool
    busy_s: float = Field(description="seconds spent on tasks since start")


class PoolStatus(BaseModel):
    size: int = Field(description="target number of workers")
    alive: int
    busy: int = Field(description="workers holding a task now")
    restarts: int = Field(description="workers replaced after dying")
    start_failures: int = Field(0, description="workers that failed to start, in a row (0 once one starts)")
    problem: str | None = Field(None, description="why the pool cannot serve as sized (the server is not ready)")
    workers: list[WorkerStatus]


class DatasetStatus(BaseModel):
    name: str
    state: str = Field("ready", description="loading (being listed), ready or failed")
    samples: int = Field(description="samples (so far, while loading)")
    classes: int
    fingerprint: str
    source: str = Field("image_folder", description="image_folder, flat, manifest, file_list, shards or plugin")
    from_cache: bool = Field(False, description="the index was read from the index cache")
    seconds: float = Field(0.0, description="time the listing took")
    error: str | None = Field(None, description="why a failed dataset could not be listed")
    traceback: str | None = Field(None, description="the last frames of a failed listing (an operator's plugin)")


class JobStatus(BaseModel):
    job_id: str
    dataset: str
    pipeline: str
    image_size: int
    batch_size: int
    world_size: int
    batches_per_rank: int
    weight: float = Field(1.0, description="its share of contended worker time (declared, or less if asked)")
    share: float = Field(0.0, description="its share of the worker time used over the demand window")
    images_per_s: float = Field(0.0, description="images/s its clients' loops took from this server (window)")
    demand_images_per_s: float | None = Field(None, description="images/s they would take if never kept waiting")
    stall_share: float | None = Field(None, description="its clients' share of their loop spent waiting (window)")
    verdict: str | None = Field(
        None, description="trainer-bound, loader-bound, network-bound or storage-bound (None: not measured yet)"
    )
    advice: str | None = Field(None, description="the verdict's line: where the time goes and what to do")


class ResizeStatus(BaseModel):
    at: float = Field(description="unix time")
    workers_from: int
    workers_to: int


class FleetStatus(BaseModel):
    """Running by demand: what the trainers ask for and the size it calls for (engine/demand.py)."""

    desired_workers: int | None = Field(description="workers this server's share of the demand needs, with headroom")
    desired_replicas: int | None = Field(description="replicas every client's demand needs, with headroom")
    demand_images_per_s: float = Field(description="images/s this server's clients would take if never kept waiting")
    fleet_demand_images_per_s: float = Field(description="images/s every client would take from the whole fleet")
    capacity_images_per_s: float | None = Field(description="images/s one busy worker renders (measured)")
    capacity_by_pipeline: dict[str, float] = Field(
        default_factory=dict, description="images/s one busy worker renders, per pipeline"
    )
    busy_share: float = Field(description="share of the pool's worker time spent on tasks")
    headroom: float
    window_s: float
    autoscale: str | None = Field(description="MIN:MAX when the pool follows desired_workers, else None")
    resizes: list[ResizeStatus] = Field(default_factory=list, description="the autoscaler's recent resizes")


class MixtureSourceStatus(BaseModel):
    mixture: str
    source: str
    weight: float = Field(description="its weight now (normalised)")
    served_epoch: int = Field(description="samples drawn from it this epoch, up to the furthest batch delivered")
    pass_number: int = Field(description="its current pass (0-based): each pass gives each sample once")
    position: int = Field(description="samples of the current pass drawn")


class PipelineStatus(BaseModel):
    name: str
    views: list[dict[str, Any]] = Field(description="each view: geometry, size, count and post-ops with arguments")


class PipelineErrorStatus(BaseModel):
    pipeline: str
    op: str = Field(description="the post-op that failed")
    path: str
    reason: str
    at: float = Field(description="unix time it happened")


class CacheStatus(BaseModel):
    budget_bytes: int = Field(description="the decoded-sample cache's budget (0: off)")
    used_bytes: int = Field(description="bytes written into it")
    entries: int = Field(description="samples held decoded")
    copies: int = Field(0, description="decoded copies held: one per sample and DCT reduction its crops needed")
    hits: int = Field(description="samples read decoded from the cache")
    misses: int = Field(description="samples of cached datasets decoded")
    decodes_per_sample: float | None = Field(description="mean decodes per sample decoded at least once")
    datasets: list[str] = Field(description="datasets declared cached")


class SecurityStatus(BaseModel):
    curve: bool = Field(description="the data socket authenticates and encrypts with CURVE")
    authorized_clients: int | None = Field(description="client keys authorised now (None without CURVE)")
    refused: dict[str, int] = Field(description="connections refused at the handshake, by reason")


class ClientStatus(BaseModel):
    client_id: str
    job_id: str
    rank: int
    world_size: int
    epoch: int
    batches: int = Field(description="batches delivered")
    images: int
    bytes: int
    inflight: int = Field(description="batches requested and not yet delivered")
    images_per_s: float = Field(description="over the last 10 s")
    mb_per_s: float = Field(description="over the last 10 s")
    stall_share: float | None = Field(description="share of the client's loop spent waiting for data")
    last_seen_s: float


class StageStatus(BaseModel):
    mean_ms: float
    p95_ms: float
    count: int = Field(description="recent values the figures cover")


class Throughput(BaseModel):
    images_per_s: float
    mb_per_s: float


class BadSampleStatus(BaseModel):
    dataset: str
    index: int
    path: str
    reason: str
    at: float = Field(description="unix time it was found")


class BadSamples(BaseModel):
    count: int
    recent: list[BadSampleStatus]


class Status(BaseModel):
    """What the server is doing. Stage times are per sample (read, decode, augment), per view image
    (geometry, postops, and ``op:<pipeline>/<op>`` for each post-op) or per batch (batch, send)."""

    version: str
    uptime_s: float
    ready: bool
    endpoints: Endpoints
    pool: PoolStatus
    datasets: list[DatasetStatus]
    jobs: list[JobStatus]
    mixtures: list[MixtureSourceStatus] = Field(
        default_factory=list, description="each source of each mixture served, at the furthest batch delivered"
    )
    pipelines: list[PipelineStatus] = Field(description="declared pipelines with their ops")
    pipeline_errors: list[PipelineErrorStatus] = Field(description="recent post-op failures, newest first")
    cache: CacheStatus
    security: SecurityStatus
    clients: list[ClientStatus]
    throughput: Throughput = Field(description="all clients, over the last 10 s")
    stall_share: float | None = Field(description="mean of the clients' reported data-stall shares")
    stages: dict[str, StageStatus]
    latency: StageStatus = Field(description="from a batch's request to its send completing")
    inflight_batches: int
    shm_bytes: int
    errors: dict[str, int] = Field(description="ERROR replies by code")
    bad_samples: BadSamples
    config: LiveConfig
    desired_workers: int | None = Field(None, description="as fleet.desired_workers")
    desired_replicas: int | None = Field(None, description="as fleet.desired_replicas")
    fleet: FleetStatus | None = None
