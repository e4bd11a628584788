"""Every setting of a loader server, declared once.

Each field below is the one declaration of a setting: its type, default, range and description.
Everything else is generated from it: the TOML key (its name), the environment variable
(``STOKER_<NAME>``), the ``stoker serve --name-with-dashes`` flag (:mod:`.flags`), and, for fields
marked :data:`LIVE`, the ``GET/PATCH /config`` models and the ``config`` block of ``/status``.
:class:`EngineSettings` is what the data plane runs with; :class:`ServerSettings` adds the process
edge (HTTP, logging, datasets, pipelines).

Example ``stoker.toml``::

    bind = "tcp://*:5555"
    http = "0.0.0.0:8080"
    workers = 8
    on_error = "skip"

    [datasets.imagenet]
    path = "/data/imagenet/train"          # an ImageFolder tree

    [datasets.subset]
    path = "/data/lists/subset.csv"        # a file list: path,label per row
    root = "/data/imagenet"

    [pipelines.train_small]
    ops = [{op = "random_resized_crop", scale = [0.35, 1.0]}, {op = "hflip", p = 0.5}]
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ByteSize, ConfigDict, Field, SecretStr, field_validator, model_validator

from stoker.server.data.declarations import DatasetDecl, Kind
from stoker.server.data.mixtures import MixtureDecl, check_mixtures
from stoker.server.data.store_config import StoreConfig
from stoker.server.imaging.limits import DecodeLimits
from stoker.server.imaging.pipelines import BUILTIN_PIPELINES, Pipeline, pipeline_from_ops, pipeline_from_views
from stoker.server.settings.host import default_index_dir, parse_http, usable_cores

__all__ = ["EngineSettings", "ServerSettings", "DatasetSettings", "PipelineSettings", "OnError", "LogLevel", "LIVE"]

OnError = Literal["skip", "raise"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LIVE: dict[str, Any] = {"live": True}
"""``json_schema_extra`` of a field that may change while serving (``PATCH /config``)."""
_MIB = 1024**2


class EngineSettings(BaseModel):
    """What the data plane runs with. Frozen: a live change makes a validated copy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bind: str = Field("tcp://*:5555", description="ZeroMQ data endpoint: tcp://HOST:PORT (port 0 picks one) or ipc://")
    curve_secret_key_file: str | None = Field(
        None,
        description="the server's CURVE secret certificate (stoker keys generate): authenticated, encrypted data",
        json_schema_extra={"flag": "--curve-secret-key"},
    )
    authorized_clients: str | None = Field(
        None, description="folder of authorised clients' public certificates (*.key), re-read when it changes"
    )
    allow_unauthenticated: bool = Field(
        False, description="serve the data socket off loopback without CURVE keys (whoever reaches it reads the data)"
    )
    workers: int = Field(
        default_factory=usable_cores,
        ge=1,
        le=1024,
        description="worker processes (default: usable CPU cores)",
        json_schema_extra=LIVE,
    )
    max_workers: int | None = Field(
        None, ge=1, le=1024, description="cap for growing the pool live (default: max(workers, 4 x cores))"
    )
    max_prefetch: int = Field(
        16, ge=1, le=1024, description="most batches one client may have in flight", json_schema_extra=LIVE
    )
    on_error: OnError = Field(
        "skip", description="bad samples: replace them (skip) or fail the batch (raise)", json_schema_extra=LIVE
    )
    cache_batches: int = Field(
        8, ge=0, le=4096, description="finished batches kept for repeated requests", json_schema_extra=LIVE
    )
    max_shm_mb: int = Field(2048, ge=1, description="shared-memory budget for batch buffers, MiB")
    max_batch_size: int = Field(4096, ge=1, le=16384, description="largest batch a job may ask for")
    max_image_size: int = Field(1024, ge=8, le=4096, description="largest image side a job may ask for")
    max_file_mb: int = Field(256, ge=1, description="larger files are bad samples")
    max_decoded_pixels: int = Field(50_000_000, ge=1, description="refuse images decoding to more pixels")
    max_image_pixels: int = Field(1_000_000_000, ge=1, description="refuse images declaring more pixels")
    client_timeout_s: float = Field(120.0, gt=0, description="forget clients silent this long", json_schema_extra=LIVE)
    drain_timeout_s: float = Field(10.0, gt=0, description="on shutdown, time to finish in-flight batches")
    worker_start_timeout_s: float = Field(120.0, gt=0, description="time for the worker pool to start")
    task_timeout_s: float = Field(120.0, gt=0, description="kill a worker stuck this long on one task")
    worker_queue_depth: int = Field(2, ge=1, le=64, description="tasks queued per worker")
    max_replacements: int = Field(64, ge=1, le=100000, description="stand-ins tried for a bad sample")
    heartbeat_ms: int = Field(2000, ge=10, le=600000, description="ZeroMQ heartbeat interval")
    cache_bytes: ByteSize = Field(
        ByteSize(0),
        description="budget of the decoded-sample cache shared by every job (e.g. 8GiB; 0: off)",
    )
    reads_in_flight: int = Field(
        16, ge=1, le=256, description="reads a worker keeps in flight for a task's samples on object storage"
    )
    worker_restart_backoff_s: float = Field(
        0.5, gt=0, le=600, description="wait before replacing a worker that failed to start (doubles per failure)"
    )
    worker_restart_backoff_max_s: float = Field(
        30.0, gt=0, le=3600, description="longest wait before replacing a worker that failed to start"
    )
    engine_stall_timeout_s: float = Field(
        60.0, gt=0, description="/healthz fails when the engine loop has not turned for this long"
    )
    autoscale_workers: str | None = Field(
        None,
        description="MIN:MAX: grow and shrink the pool live toward desired_workers (off by default)",
        json_schema_extra={"metavar": "MIN:MAX"},
    )
    autoscale_interval_s: float = Field(
        30.0, gt=0, le=86400, description="autoscaling: no pool change more often than this (shrink after as long)"
    )
    demand_headroom: float = Field(0.15, ge=0, le=10, description="desired_workers/replicas: headroom over demand")
    demand_window_s: float = Field(
        10.0, gt=0, le=3600, description="window of the clients' demand, workers' capacity and jobs' shares"
    )
    s3_tries: int = Field(3, ge=1, le=100, description="object storage: tries per request (retries with backoff)")
    s3_backoff_s: float = Field(0.1, gt=0, description="object storage: first retry's wait (doubles, with jitter)")
    s3_connect_timeout_s: float = Field(5.0, gt=0, description="object storage: time to connect")
    s3_request_timeout_s: float = Field(30.0, gt=0, description="object storage: one request, its body included")
    s3_read_timeout_s: float = Field(30.0, gt=0, description="object storage: longest silence inside a stream")
    s3_retry_timeout_s: float = Field(120.0, gt=0, description="object storage: no retry starts after this long")

    @model_validator(mode="before")
    @classmethod
    def _default_max_workers(cls, data: Any) -> Any:
        # Resolved here, once: the live PATCH range and the pool both read the number.
        if isinstance(data, dict) and data.get("max_workers") is None:
            try:
                workers = int(data["workers"]) if data.get("workers") is not None else usable_cores()
            except (TypeError, ValueError):
                return data  # the field's own validation names the bad value
            high = 0
            if isinstance(data.get("autoscale_workers"), str):
                with contextlib.suppress(ValueError):
                    high = _bounds(data["autoscale_workers"])[1]  # the field's own check names a bad one
            data = {**data, "max_workers": max(workers, 4 * usable_cores(), high)}
        return data

    @model_validator(mode="after")
    def _check_workers(self) -> Self:
        if self.max_workers is not None and self.workers > self.max_workers:
            raise ValueError(f"workers={self.workers} must be <= max_workers={self.max_workers}")
        bounds = self.autoscale_bounds
        if bounds is not None and self.max_workers is not None and bounds[1] > self.max_workers:
            raise ValueError(
                f"autoscale_workers={self.autoscale_workers!r}: MAX must be <= max_workers={self.max_workers}"
            )
        return self

    @field_validator("autoscale_workers")
    @classmethod
    def _check_autoscale(cls, value: str | None) -> str | None:
        if value is not None:
            _bounds(value)
        return value

    @property
    def autoscale_bounds(self) -> tuple[int, int] | None:
        """``autoscale_workers`` as ``(MIN, MAX)``; ``None``: off."""
        return None if self.autoscale_workers is None else _bounds(self.autoscale_workers)

    @field_validator("bind")
    @classmethod
    def _check_bind(cls, value: str) -> str:
        if not value.startswith(("tcp://", "ipc://")):
            raise ValueError(f"bind={value!r} must be a ZeroMQ endpoint such as tcp://*:5555 or ipc:///run/stoker")
        return value

    live_fields: ClassVar[tuple[str, ...]]
    """Names of the fields :meth:`with_changes` may change (set below the class)."""

    @property
    def max_shm_bytes(self) -> int:
        """The shared-memory budget in bytes."""
        return self.max_shm_mb * _MIB

    @property
    def limits(self) -> DecodeLimits:
        """What a worker refuses to decode."""
        return DecodeLimits(self.max_file_mb * _MIB, self.max_image_pixels, self.max_decoded_pixels)

    @property
    def store_config(self) -> StoreConfig:
        """How hard object storage is tried, and how long it is waited for."""
        return StoreConfig(
            tries=self.s3_tries,
            backoff_s=self.s3_backoff_s,
            connect_timeout_s=self.s3_connect_timeout_s,
            request_timeout_s=self.s3_request_timeout_s,
            read_timeout_s=self.s3_read_timeout_s,
            retry_timeout_s=self.s3_retry_timeout_s,
        )

    def with_changes(self, **changes: Any) -> Self:
        """A validated copy with live fields changed; raises ``ValueError`` naming any other field."""
        fixed = sorted(set(changes) - set(self.live_fields))
        if fixed:
            raise ValueError(f"cannot change {fixed} while serving; live: {sorted(self.live_fields)}")
        return type(self).model_validate({**self.model_dump(), **changes})


def _bounds(text: str) -> tuple[int, int]:
    """``"MIN:MAX"`` as two ints with 1 <= MIN <= MAX <= 1024; ``ValueError`` otherwise."""
    low, sep, high = text.partition(":")
    try:
        bounds = int(low), int(high)
    except ValueError:
        bounds = (0, 0)
    if not sep or not 1 <= bounds[0] <= bounds[1] <= 1024:
        raise ValueError(f"autoscale_workers={text!r} must be MIN:MAX with 1 <= MIN <= MAX <= 1024 (e.g. 2:16)")
    return bounds


def _live(model: type[BaseModel]) -> tuple[str, ...]:
    return tuple(name for name, info in model.model_fields.items() if info.json_schema_extra == LIVE)


EngineSettings.live_fields = _live(EngineSettings)


class DatasetSettings(BaseModel):
    """A declared dataset (see :mod:`stoker.server.data.declarations`): an ImageFolder tree, a flat
    folder with ``label_pattern``, a manifest (CSV/TSV/JSON Lines), a tar-shard pattern, any of them
    under an ``s3://`` URL, or an operator's ``plugin`` listing."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str | None = None
    kind: Kind = "auto"
    root: str | None = None
    label_pattern: str | None = None
    plugin: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    cache: bool = False
    """Keep its decoded images in the server's decoded-sample cache (``cache_bytes``)."""
    weight: float = Field(1.0, gt=0, le=1000)
    """Its jobs' share of worker time among contending jobs (fair queuing; a client may ask for less)."""
    cache_min_side: int = Field(0, ge=0, le=65536)
    """A cached dataset's images are decoded down (in the DCT domain) as far as keeps their shorter
    side at least this; 0 keeps them full size. The same rule holds with or without the cache, so the
    cache never changes a byte."""
    targets: dict[str, str] = Field(default_factory=dict)
    """Per-sample fields beyond the class label, ``{field = "kind or member extension"}``: kinds
    ``label``, ``text``, ``json``, ``boxes``, ``mask``; shard extensions ``txt``, ``json``, ``cls``,
    ``png``, ``seg.png``."""
    box_format: str = "xyxy"
    """How a ``boxes`` field writes its boxes in the source: ``xyxy``, ``xywh`` or ``cxcywh``."""
    min_box_visibility: float = Field(0.0, ge=0.0, le=1.0)
    """A box (with its class) is kept when at least this share of it remains after the crop."""
    crowd: bool = False
    """``kind = "coco"``: keep ``iscrowd`` boxes too."""

    @model_validator(mode="after")
    def _path_or_plugin(self) -> Self:
        if (self.path is None) == (self.plugin is None):
            raise ValueError("a dataset has a 'path' or a 'plugin', one of the two")
        return self


class PipelineSettings(BaseModel):
    """A declared pipeline: an op list, or a list of views each with its own op list (see
    :mod:`stoker.server.imaging.pipelines`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ops: list[dict[str, Any]] | None = None
    views: list[dict[str, Any]] | None = None
    exact_torchvision: bool = False
    """Every torchvision op of the pipeline runs torchvision's own kernel (as ``exact = true`` on each)."""

    @model_validator(mode="after")
    def _one_form(self) -> Self:
        if (self.ops is None) == (self.views is None):
            raise ValueError("a pipeline has either 'ops' (one view) or 'views' (several), not both or neither")
        return self


class MixtureSettings(BaseModel):
    """A declared mixture (see :mod:`stoker.server.data.mixtures`): declared datasets by weight."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    datasets: dict[str, Any]
    """Source dataset -> weight (any positive numbers; normalised). Checked, naming the bad one, at start."""
    epoch_samples: int | None = Field(None, gt=0)
    pipelines: dict[str, str] = Field(default_factory=dict)
    weight: float = Field(1.0, gt=0, le=1000)
    """The mixture's jobs' share of contended workers among other jobs (weighted fair queuing)."""


class ServerSettings(EngineSettings):
    """Every option of ``stoker serve``: the engine's, plus the HTTP side, logging and the catalog."""

    http: str = Field("127.0.0.1:8080", description="HOST:PORT of the HTTP side (port 0 picks one)")
    http_token: SecretStr | None = Field(
        None, description="bearer token every HTTP endpoint but the probes requires (PATCH /config always)"
    )
    http_token_file: str | None = Field(None, description="read the bearer token from this file (a mounted secret)")
    http_public_reads: bool = Field(
        False, description="let GET endpoints answer without the token (probes /healthz and /readyz always do)"
    )
    http_tls_cert_file: str | None = Field(
        None, description="serve HTTPS with this certificate (PEM)", json_schema_extra={"flag": "--http-tls-cert"}
    )
    http_tls_key_file: str | None = Field(
        None, description="the TLS certificate's private key (PEM)", json_schema_extra={"flag": "--http-tls-key"}
    )
    log_level: LogLevel = Field("INFO", description="level of the server's log", json_schema_extra=LIVE)
    ready_file: str | None = Field(None, description="write the bound endpoints here as JSON once serving")
    index_dir: str = Field(
        default_factory=lambda: default_index_dir(),
        description="where manifest and shard indexes are cached (keyed by what they list)",
    )
    datasets: dict[str, DatasetSettings] = Field(default_factory=dict, description="declared datasets by name")
    cache: list[str] = Field(
        default_factory=list,
        description="keep these datasets' decoded images in the decoded-sample cache (as cache = true in their table)",
        json_schema_extra={"metavar": "NAME"},
    )
    pipelines: dict[str, PipelineSettings] = Field(default_factory=dict, description="declared pipelines by name")
    mixtures: dict[str, MixtureSettings] = Field(
        default_factory=dict, description="declared mixtures by name: datasets by weight"
    )

    @model_validator(mode="before")
    @classmethod
    def _token_from_file(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("http_token") is None and data.get("http_token_file"):
            path = data["http_token_file"]
            try:
                token = Path(path).read_text().strip()
            except OSError as exc:
                raise ValueError(f"http_token_file={path!r}: {exc.strerror}") from None
            if not token:
                raise ValueError(f"http_token_file={path!r} is empty")
            data = {**data, "http_token": token}
        return data

    @model_validator(mode="before")
    @classmethod
    def _mark_cached(cls, data: Any) -> Any:
        # `cache = ["a"]` (--cache a, STOKER_CACHE=a) is `cache = true` in dataset a's table.
        if not isinstance(data, dict) or not data.get("cache"):
            return data
        names, declared = data["cache"], dict(data.get("datasets") or {})
        if isinstance(names, str) or not isinstance(names, list):
            return data  # the field's own validation names the bad value
        for name in names:
            if name not in declared:
                raise ValueError(f"cache: no dataset {name!r} is declared; declared: {sorted(declared)}")
            table = declared[name]
            declared[name] = (
                {**table, "cache": True} if isinstance(table, dict) else table.model_copy(update={"cache": True})
            )
        return {**data, "datasets": declared}

    @field_validator("http")
    @classmethod
    def _check_http(cls, value: str) -> str:
        parse_http(value)
        return value

    @field_validator("datasets")
    @classmethod
    def _check_names(cls, value: dict[str, DatasetSettings]) -> dict[str, DatasetSettings]:
        from stoker.client.protocol.job import JobSpec

        for name in value:
            JobSpec(dataset=name)  # raises ValueError naming the bad dataset name
        return value

    def engine_config(self) -> EngineSettings:
        """The engine's part of the settings."""
        return EngineSettings.model_validate(self.model_dump(include=set(EngineSettings.model_fields)))

    def dataset_decls(self) -> list[DatasetDecl]:
        """Dataset declarations (their kind decided from what they name when ``auto``)."""
        return [
            DatasetDecl(
                name,
                e.path,
                e.kind,
                e.root,
                e.label_pattern,
                e.plugin,
                dict(e.kwargs),
                e.cache,
                e.cache_min_side,
                weight=e.weight,
                targets=dict(e.targets),
                box_format=e.box_format,
                min_box_visibility=e.min_box_visibility,
                crowd=e.crowd,
            ).resolved()
            for name, e in self.datasets.items()
        ]

    def mixture_decls(self) -> list[MixtureDecl]:
        """Mixture declarations; raises ``ValueError`` naming what cannot be served."""
        decls = [
            MixtureDecl(name, dict(m.datasets), m.epoch_samples, dict(m.pipelines), m.weight)
            for name, m in self.mixtures.items()
        ]
        check_mixtures(decls, self.datasets, self.pipeline_map())
        return decls

    def pipeline_map(self) -> dict[str, Pipeline]:
        """Built-in pipelines plus declared ones (a declared name overrides a built-in)."""
        declared = {
            name: pipeline_from_ops(name, entry.ops, entry.exact_torchvision)
            if entry.ops is not None
            else pipeline_from_views(name, entry.views or [], entry.exact_torchvision)
            for name, entry in self.pipelines.items()
        }
        return {**BUILTIN_PIPELINES, **declared}


ServerSettings.live_fields = _live(ServerSettings)
