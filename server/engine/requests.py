"""Reading client messages: a ``HELLO`` or ``REQUEST`` header becomes a checked, typed request bound
to an open job, or a :class:`ProtocolError` with the code to answer with. Nothing here has state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stoker.client.protocol.errors import ProtocolError
from stoker.client.protocol.job import JobSpec
from stoker.client.protocol.wire import ErrorCode, Header
from stoker.server.engine.jobs import JobRegistry, OpenJob
from stoker.server.engine.records import BatchKey
from stoker.server.version import VERSION

__all__ = ["Hello", "BatchRequest", "read_hello", "read_request", "job_info", "header_where", "MAX_EPOCH"]

MAX_EPOCH = 2**31 - 1
_MAX_CLIENT_ID = 64


@dataclass(frozen=True, slots=True)
class Hello:
    """A client opening a job."""

    job: OpenJob
    client: str
    rank: int
    prefetch: int | None


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """A client asking for one batch."""

    job: OpenJob
    key: BatchKey
    client: str
    waited_s: float | None
    elapsed_s: float | None
    images: int | None = None
    """The client's cumulative images handed to its loop (with the two above: its demand)."""
    weight: float | None = None
    """The share of worker time the client's job asks for (capped at the declared weight)."""


def _open(jobs: JobRegistry, raw_job: dict[str, Any]) -> OpenJob:
    return jobs.open(JobSpec.from_wire(raw_job))


def read_hello(header: Header, jobs: JobRegistry) -> Hello:
    """The job a ``HELLO`` opens; raises :class:`ProtocolError`."""
    fields = header.fields
    return Hello(
        _open(jobs, fields["job"]), fields["client"][:_MAX_CLIENT_ID], fields.get("rank", 0), fields.get("prefetch")
    )


def read_request(header: Header, jobs: JobRegistry) -> BatchRequest:
    """The batch a ``REQUEST`` asks for, checked against its job's plan; raises :class:`ProtocolError`."""
    fields = header.fields
    job = _open(jobs, fields["job"])
    epoch, rank, k = fields["epoch"], fields["rank"], fields["k"]
    if not 0 <= epoch <= MAX_EPOCH:
        raise ProtocolError(f"epoch={epoch} must be in [0, {MAX_EPOCH}]", ErrorCode.OUT_OF_RANGE)
    if not 0 <= rank < job.spec.world_size:
        raise ProtocolError(f"rank={rank} must be in [0, {job.spec.world_size})", ErrorCode.OUT_OF_RANGE)
    if not 0 <= k < job.batches:
        raise ProtocolError(
            f"k={k} is past the end of the epoch: this job has {job.batches} batches per rank", ErrorCode.OUT_OF_RANGE
        )
    fingerprint = fields.get("fingerprint")
    if fingerprint is not None and fingerprint != job.table.fingerprint:
        raise ProtocolError(
            f"dataset {job.spec.dataset!r} on this server differs from the one the job was opened on",
            ErrorCode.DATASET_CHANGED,
        )
    waited, elapsed = fields.get("waited_s"), fields.get("elapsed_s")
    images, weight = fields.get("images"), fields.get("weight")
    if images is not None and images < 0:
        raise ProtocolError(f"images={images} must be >= 0", ErrorCode.BAD_MESSAGE)
    if weight is not None and not 0 < weight <= 1000:
        raise ProtocolError(f"weight={weight} must be in (0, 1000]", ErrorCode.BAD_MESSAGE)
    for name, value in (("waited_s", waited), ("elapsed_s", elapsed)):
        if value is not None and not 0 <= value < 1e12:
            raise ProtocolError(f"{name}={value} must be a duration >= 0", ErrorCode.BAD_MESSAGE)
    return BatchRequest(
        job,
        (job.job_id, epoch, rank, k),
        fields["client"][:_MAX_CLIENT_ID],
        None if waited is None else float(waited),
        None if elapsed is None else float(elapsed),
        images,
        None if weight is None else float(weight),
    )


def job_info(job: OpenJob, granted_prefetch: int) -> dict[str, Any]:
    """The fields of the ``JOB_INFO`` answering a ``HELLO`` for ``job``."""
    table, sizes = job.table, job.sizes
    info: dict[str, Any] = {
        "job_id": job.job_id,
        "samples": job.samples,
        "classes": list(table.classes) if len(table.classes) <= 10000 else [],
        "batches": job.batches,
        "image_shape": [sizes[0], sizes[0], 3],
        "fingerprint": table.fingerprint,
        "prefetch": granted_prefetch,
        "server": VERSION,
    }
    if job.pipeline.multi_view:
        info["views"] = [[side, side, 3] for side in sizes]
    if job.mixture is not None:
        info["mixture"] = {
            "sources": list(job.mixture.names),
            "sizes": list(job.mixture.sizes),
            "weights": list(job.mixture.weights),
            "epoch_samples": job.mixture.epoch_samples,
        }
    if job.targets:
        info["targets"] = dict(job.targets)
    return info


def header_where(header: Header | None) -> dict[str, int]:
    """The batch coordinates a message names, for the ``ERROR`` answering it."""
    if header is None:
        return {}
    fields = header.fields
    return {name: fields[name] for name in ("epoch", "rank", "k") if isinstance(fields.get(name), int)}
