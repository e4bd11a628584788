"""Server settings at the process edge: one pydantic model, read from a TOML file, the environment
(``STOKER_<FIELD>``) and the command line, in increasing precedence, then turned into engine config.

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

import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from stoker.server.data.catalog import DatasetDecl
from stoker.server.engine.config import EngineConfig, OnError, usable_cores
from stoker.server.imaging.decode import DecodeLimits
from stoker.server.imaging.pipelines import BUILTIN_PIPELINES, Pipeline, pipeline_from_ops

__all__ = ["DatasetSettings", "PipelineSettings", "ServerSettings", "load_settings", "parse_http", "LogLevel"]

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class DatasetSettings(BaseModel):
    """A declared dataset: a folder (ImageFolder) or a CSV/TSV file list."""

    model_config = ConfigDict(extra="forbid")
    path: str
    kind: Literal["auto", "image_folder", "file_list"] = "auto"
    root: str | None = None


class PipelineSettings(BaseModel):
    """A declared pipeline as an op list (see :mod:`stoker.server.imaging.pipelines`)."""

    model_config = ConfigDict(extra="forbid")
    ops: list[dict[str, Any]]


class ServerSettings(BaseModel):
    """Every option of ``stoker serve``; each is also ``STOKER_<NAME>`` in the environment."""

    model_config = ConfigDict(extra="forbid")
    bind: str = Field("tcp://*:5555", description="ZeroMQ endpoint for data (tcp://HOST:PORT; port 0 picks one)")
    http: str = Field("127.0.0.1:8080", description="HOST:PORT of the HTTP side (port 0 picks one)")
    http_token: SecretStr | None = Field(None, description="bearer token required by PATCH /config")
    http_token_file: str | None = Field(None, description="read the bearer token from this file (a mounted secret)")
    workers: int = Field(default_factory=usable_cores, ge=1, le=1024, description="worker processes")
    max_workers: int | None = Field(None, ge=1, le=1024, description="cap for live pool growth (default 4 x cores)")
    max_prefetch: int = Field(16, ge=1, le=1024, description="most batches in flight per client")
    on_error: OnError = Field("skip", description="bad samples: skip (replace) or raise")
    cache_batches: int = Field(8, ge=0, le=4096, description="finished batches kept for repeated requests")
    max_shm_mb: int = Field(2048, ge=1, description="shared-memory budget for batch buffers, MiB")
    max_batch_size: int = Field(4096, ge=1, le=16384)
    max_image_size: int = Field(1024, ge=8, le=4096)
    max_file_mb: int = Field(256, ge=1, description="larger files are bad samples")
    max_decoded_pixels: int = Field(50_000_000, ge=1, description="refuse images decoding to more pixels")
    max_image_pixels: int = Field(1_000_000_000, ge=1, description="refuse images declaring more pixels")
    client_timeout_s: float = Field(120.0, gt=0, description="forget clients silent this long")
    drain_timeout_s: float = Field(10.0, gt=0, description="time to finish in-flight batches on shutdown")
    worker_start_timeout_s: float = Field(120.0, gt=0)
    task_timeout_s: float = Field(120.0, gt=0, description="kill a worker stuck this long on one task")
    heartbeat_ms: int = Field(2000, ge=10, le=600000, description="ZeroMQ heartbeat interval")
    log_level: LogLevel = "INFO"
    ready_file: str | None = Field(None, description="write the bound endpoints here as JSON once serving")
    datasets: dict[str, DatasetSettings] = Field(default_factory=dict)
    pipelines: dict[str, PipelineSettings] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _token_from_file(self) -> ServerSettings:
        if self.http_token is None and self.http_token_file:
            try:
                token = Path(self.http_token_file).read_text().strip()
            except OSError as exc:
                raise ValueError(f"http_token_file={self.http_token_file!r}: {exc.strerror}") from None
            if not token:
                raise ValueError(f"http_token_file={self.http_token_file!r} is empty")
            self.http_token = SecretStr(token)
        return self

    @field_validator("http")
    @classmethod
    def _check_http(cls, value: str) -> str:
        parse_http(value)
        return value

    @field_validator("bind")
    @classmethod
    def _check_bind(cls, value: str) -> str:
        if not value.startswith(("tcp://", "ipc://")):
            raise ValueError(f"bind={value!r} must look like tcp://HOST:PORT")
        return value

    @field_validator("datasets")
    @classmethod
    def _check_names(cls, value: dict[str, DatasetSettings]) -> dict[str, DatasetSettings]:
        from stoker.client.protocol.job import JobSpec

        for name in value:
            JobSpec(dataset=name)  # raises ValueError naming the bad dataset name
        return value

    def engine_config(self) -> EngineConfig:
        """The engine's frozen config."""
        return EngineConfig(
            bind=self.bind,
            workers=self.workers,
            max_workers=self.max_workers or max(self.workers, 4 * usable_cores()),
            max_prefetch=self.max_prefetch,
            on_error=self.on_error,
            cache_batches=self.cache_batches,
            max_shm_bytes=self.max_shm_mb * 1024**2,
            max_batch_size=self.max_batch_size,
            max_image_size=self.max_image_size,
            client_timeout_s=self.client_timeout_s,
            drain_timeout_s=self.drain_timeout_s,
            worker_start_timeout_s=self.worker_start_timeout_s,
            task_timeout_s=self.task_timeout_s,
            heartbeat_ms=self.heartbeat_ms,
            limits=DecodeLimits(
                max_file_bytes=self.max_file_mb * 1024**2,
                max_image_pixels=self.max_image_pixels,
                max_decoded_pixels=self.max_decoded_pixels,
            ),
        )

    def dataset_decls(self) -> list[DatasetDecl]:
        """Dataset declarations; ``auto`` means a folder is an ImageFolder and a file a file list."""
        decls = []
        for name, entry in self.datasets.items():
            path = Path(entry.path).expanduser()
            kind = entry.kind if entry.kind != "auto" else ("file_list" if path.is_file() else "image_folder")
            decls.append(DatasetDecl(name, path, kind, Path(entry.root).expanduser() if entry.root else None))
        return decls

    def pipeline_map(self) -> dict[str, Pipeline]:
        """Built-in pipelines plus declared ones (a declared name overrides a built-in)."""
        declared = {name: pipeline_from_ops(name, entry.ops) for name, entry in self.pipelines.items()}
        return {**BUILTIN_PIPELINES, **declared}


def parse_http(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) to ``(host, port)``."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ValueError(f"http={value!r} must be HOST:PORT with a port in [0, 65535]")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts local connections."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ServerSettings.model_fields:
        raw = env.get(f"STOKER_{name.upper()}")
        if raw is None:
            continue
        if name in ("datasets", "pipelines"):
            out[name] = json.loads(raw)
        else:
            out[name] = raw
    return out


def load_settings(
    config_file: Path | None = None, env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> ServerSettings:
    """Merge file < environment < command line and validate; raises ``ValueError`` on bad input."""
    merged: dict[str, Any] = {}
    if config_file is not None:
        with open(config_file, "rb") as handle:
            merged.update(tomllib.load(handle))
    merged.update(_from_env(os.environ if env is None else env))
    for key, value in (overrides or {}).items():
        if key == "datasets":
            merged["datasets"] = {**merged.get("datasets", {}), **value}
        elif value is not None:
            merged[key] = value
    return ServerSettings.model_validate(merged)
