"""``stoker bench``: stoker against torch's DataLoader on the same data and cores, in one run.

Rows, run one after another and repeated (interleaved, so drift hits all alike):

- (a) ``dataloader_seed``: the plain DataLoader recipe (float32 out)
- (b) ``dataloader_strong``: a DataLoader doing stoker's work (uint8 out)
- (c) ``decode_1core``: the fastest decoder here on one core: the per-core limit
- (d) ``stoker``: a real server and client over loopback (uint8 out)
- (e) ``stoker_cached`` (``--cache``): the same with the decoded-sample cache, from its second epoch
- (f) ``stoker_curve`` (``--curve``): (d) with CURVE authentication and encryption on the data plane
  (and the wire path measured with CURVE too)
- (g) ``dataloader_albumentations`` (``--albumentations``): a DataLoader running the pipeline written
  with albumentations (:mod:`.peers`)
- (h) ``dali`` (``--dali-python PY``): NVIDIA DALI's CPU pipeline for the DINO multi-crop recipe, run
  by that Python (:mod:`.peers`)
- (i) ``stoker_mixture`` (``--mixture``): (d) reading a mixture of three sources (the data declared
  three times, weights 0.6/0.3/0.1) instead of the one dataset: the cost of mixing

plus the wire path alone (GB/s), and stoker's per-stage and per-op times from its ``/status``.
Reported: images/s (median and range), MB/s, CPU-seconds per 1,000 images (the whole process tree),
(d)/(a), (d)/(b), (d)/(g), (d)/(h) and (d) / (cores x (c)). Each row is reported by its median run
(:mod:`stoker.server.tools.measure`).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stoker.server.imaging.pipelines import Pipeline
from stoker.server.tools.bench.keys import BenchKeys
from stoker.server.tools.bench.report import dump_json, format_table, ratios
from stoker.server.tools.measure import Run, Series, Stream, timed_window

__all__ = ["BenchConfig", "run_bench", "format_table", "dump_json"]

_WARMUP_BATCHES = 2
"""Skipped at the start of every run: the first requests, page faults and thread pools."""


@dataclass(frozen=True)
class BenchConfig:
    """What to run."""

    data: str
    """An ImageFolder directory (every row), or any other dataset path stoker serves: a manifest, a
    shard pattern, an ``s3://`` URL (stoker's rows only: the DataLoader rows need a local folder)."""
    pipeline: str = "train"
    image_size: int = 224
    batch_size: int = 64
    workers: int | None = None
    """Workers for every loader (None or 0: the usable CPU cores)."""
    seconds: float = 10.0
    repeats: int = 3
    poll_status_ms: float = 0.0
    """Also run stoker with ``/status`` polled this often (0: don't)."""
    config_file: Path | None = None
    """A server config declaring ``pipeline`` (its ``[pipelines.*]`` tables)."""
    server_args: tuple[str, ...] = ()
    """More ``stoker serve`` flags for stoker's rows (e.g. ``--reads-in-flight 1``)."""
    cache_bytes: str | None = None
    """Also run stoker with its decoded-sample cache of this budget (e.g. ``4GiB``), timed from its
    second epoch on: row (e)."""
    curve: bool = False
    """Also run stoker with CURVE on its data socket (row (f)) and the wire path with CURVE."""
    albumentations: bool = False
    """Also run a DataLoader with the pipeline written in albumentations (row (g))."""
    dali_python: str | None = None
    """Also run DALI's DINO multi-crop pipeline under this Python (row (h))."""
    dali_script: Path | None = None
    """The DALI peer script (default: ``../shared/peers/dali_dino.py`` from the repository)."""
    mixture: bool = False
    """Also run stoker on a three-source mixture of the data (row (i))."""
    targets: str | None = None
    """``detection`` or ``captions``: the targets rows instead (:mod:`.targets`; ``data`` a JPEG folder)."""

    def __post_init__(self) -> None:
        if not self.folder and not _dataset_path(self.data):
            raise ValueError(f"--data {self.data} is not a directory, a manifest, a shard pattern or an s3:// URL")
        self.resolve_pipeline()  # an unknown name or a bad config is refused before anything runs
        if not self.seconds > 0:
            raise ValueError(f"--seconds must be > 0, not {self.seconds}")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be at least 1, not {self.repeats}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers must be >= 0, not {self.workers}")
        if self.targets is not None:
            from stoker.server.tools.bench.targets import TARGET_MODES

            if self.targets not in TARGET_MODES:
                raise ValueError(f"--targets {self.targets!r} must be one of {TARGET_MODES}")
            if self.folder is None:
                raise ValueError("--targets needs --data to be a local folder of JPEGs")

    @property
    def folder(self) -> Path | None:
        """The data as a local ImageFolder directory, if it is one."""
        path = Path(self.data)
        return path if not self.data.startswith("s3://") and path.is_dir() else None

    def resolve_pipeline(self) -> Pipeline:
        """The pipeline benchmarked: a built-in, or one ``config_file`` declares."""
        from stoker.server.settings import load_settings

        try:
            pipelines = load_settings(self.config_file, env={}).pipeline_map()
        except (ValueError, OSError) as exc:
            raise ValueError(f"--config {self.config_file}: {exc}") from None
        if self.pipeline not in pipelines:
            raise ValueError(f"--pipeline {self.pipeline!r} is not declared; known: {sorted(pipelines)}")
        return pipelines[self.pipeline]


class _Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled

    def step(self, label: str) -> None:
        if self.enabled:
            filled = int(30 * self.done / self.total)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {label:<40}")
            sys.stderr.flush()
        self.done += 1

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write(f"\r[{'#' * 30}] {self.total}/{self.total} {'done':<40}\n")


Factory = Callable[[], AbstractContextManager[Stream]]


def _dataset_path(data: str) -> bool:
    return data.startswith("s3://") or "{" in data or Path(data).is_file()


def _target_loaders(
    config: BenchConfig, workers: int, prepared: tuple[Path, str, list[str]]
) -> dict[str, tuple[str, Factory | None]]:
    """The targets rows: the usual loader carrying them, stoker with them, stoker without them."""
    from stoker.server.tools.bench.loaders import stoker_stream
    from stoker.server.tools.bench.targets import DATASET, captions_loader, detection_loader

    config_file, data, targets = prepared
    size, batch, name, pipeline = config.image_size, config.batch_size, config.pipeline, config.resolve_pipeline()
    folder = config.folder or Path(config.data)
    server_args = ["--config", str(config_file), *config.server_args]
    if config.targets == "detection":
        baseline = (
            "(b) DataLoader, v2 + tv_tensors",
            lambda: detection_loader(Path(data), folder, pipeline, size, batch, workers),
        )
    else:
        baseline = (
            "(b) DataLoader, webdataset pipeline",
            lambda: captions_loader(data, pipeline, size, batch, workers),
        )
    return {
        "dataloader_strong": baseline,
        "stoker": (
            f"(d) stoker, with {'+'.join(targets)}",
            lambda: stoker_stream(
                config.data, size, batch, workers, name, server_args=server_args, dataset=DATASET, targets=targets
            ),
        ),
        "stoker_no_targets": (
            "(d) stoker, images only",
            lambda: stoker_stream(config.data, size, batch, workers, name, server_args=server_args, dataset=DATASET),
        ),
    }


def _loaders(
    config: BenchConfig, workers: int, keys: BenchKeys | None = None, stages: dict[str, float] | None = None
) -> dict[str, tuple[str, Factory | None]]:
    """Each row: its label and how to open its stream (``None``: measured apart); row (d) fills
    ``stages`` with its server's mean milliseconds per stage and per op at the end of each run."""
    from stoker.server.tools.bench.loaders import seed_recipe, stoker_stream, strong_recipe

    data, size, batch, name = config.data, config.image_size, config.batch_size, config.pipeline
    server_args = (["--config", str(config.config_file)] if config.config_file else []) + list(config.server_args)
    pipeline = config.resolve_pipeline()
    rows: dict[str, tuple[str, Factory | None]] = {}
    folder = config.folder
    if folder is not None:
        rows["dataloader_seed"] = ("(a) DataLoader seed recipe", lambda: seed_recipe(folder, size, batch, workers))
        rows["dataloader_strong"] = (
            "(b) DataLoader, stoker's work",
            lambda: strong_recipe(folder, size, batch, workers, pipeline),
        )
        rows["decode_1core"] = ("(c) decode, 1 core", None)
    rows["stoker"] = (
        "(d) stoker end to end",
        lambda: stoker_stream(data, size, batch, workers, name, server_args=server_args, stages=stages),
    )
    if config.cache_bytes:
        cached_args = [*server_args, "--cache", "bench", "--cache-bytes", config.cache_bytes]
        rows["stoker_cached"] = (
            "(e) stoker, decoded cache, epochs 2+",
            lambda: stoker_stream(data, size, batch, workers, name, server_args=cached_args),
        )
    if keys is not None:
        curve_args = [*server_args, *keys.serve_args]
        rows["stoker_curve"] = (
            "(f) stoker, CURVE on",
            lambda: stoker_stream(data, size, batch, workers, name, server_args=curve_args, client_keys=keys.client),
        )
    if folder is not None and config.albumentations:
        from stoker.server.tools.bench.peers import albumentations_recipe, albumentations_transform

        albumentations_transform(pipeline, size)  # an op without an albumentations form fails before any run
        rows["dataloader_albumentations"] = (
            "(g) DataLoader, albumentations",
            lambda: albumentations_recipe(folder, size, batch, workers, pipeline),
        )
    if folder is not None and config.dali_python:
        rows["dali"] = ("(h) DALI CPU, DINO recipe", None)
    if config.mixture:
        # The data as three sources, so (g) reads the same files as (d) and differs only by mixing.
        mixed_args = [*server_args, "--dataset", f"bench_b={data}", "--dataset", f"bench_c={data}"]
        mixture = {"bench_mix": {"datasets": {"bench": 0.6, "bench_b": 0.3, "bench_c": 0.1}}}
        rows["stoker_mixture"] = (
            "(i) stoker, 3-source mixture",
            lambda: stoker_stream(
                data,
                size,
                batch,
                workers,
                name,
                server_args=mixed_args,
                dataset="bench_mix",
                env={"STOKER_MIXTURES": json.dumps(mixture)},
            ),
        )
    if config.poll_status_ms:
        poll = config.poll_status_ms
        rows["stoker_polled"] = (
            f"(d) + /status every {poll:g} ms",
            lambda: stoker_stream(data, size, batch, workers, name, poll_status_ms=poll, server_args=server_args),
        )
    return rows


def _decode_run(row: Series, files: list[Path], seconds: float) -> dict[str, float]:
    from stoker.server.tools.bench.decode_rate import single_core_rates

    rates = single_core_rates(files, seconds)
    best = max(rates, key=rates.__getitem__)
    row.note = best
    # One core, busy all along: its CPU seconds are its wall seconds.
    row.runs.append(Run(int(rates[best] * seconds), nbytes=0, wall_s=seconds, cpu_s=seconds))
    return rates


def _dali_run(config: BenchConfig, workers: int) -> Run:
    from stoker.server.tools.bench.peers import dali_run

    assert config.folder is not None and config.dali_python is not None
    sample_nbytes = sum(side * side * 3 for side in config.resolve_pipeline().sizes(config.image_size))
    from stoker.server.tools.bench.peers import DALI_DINO

    script = config.dali_script or DALI_DINO
    return dali_run(config.dali_python, config.folder, workers, config.batch_size, sample_nbytes, script)


def run_bench(config: BenchConfig, progress: bool = True) -> dict[str, Any]:
    """Run every row ``repeats`` times, interleaved; return the results as a JSON-ready dict."""
    from stoker.server.settings.host import usable_cores

    workers = config.workers or usable_cores()
    config = replace(config, workers=workers)  # the report shows the count used
    folder = config.folder
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg")) if folder else []
    if folder is not None and not files:
        raise ValueError(f"no JPEG files under {config.data}")
    with contextlib.ExitStack() as stack:
        keys = stack.enter_context(BenchKeys.made()) if config.curve else None
        stages: dict[str, float] = {}
        loaders = _loaders(config, workers, keys, stages)
        if config.targets is not None and folder is not None:
            from stoker.server.tools.bench.targets import prepare

            prepared = stack.enter_context(prepare(config.targets, folder, config.config_file))
            loaders = _target_loaders(config, workers, prepared)
        return _run_rows(config, workers, files, keys, progress, loaders, stages)


def _run_rows(
    config: BenchConfig,
    workers: int,
    files: list[Path],
    keys: BenchKeys | None,
    progress: bool,
    loaders: dict[str, tuple[str, Factory | None]],
    stages: dict[str, float],
) -> dict[str, Any]:
    """Run ``loaders`` interleaved; row (d) fills ``stages`` (its server's mean ms per stage and op)."""
    from stoker.server.settings.host import usable_cores
    from stoker.server.tools.bench.wire_rate import wire_rate

    rows = {key: Series(label) for key, (label, _) in loaders.items()}
    bar = _Progress(config.repeats * len(rows) + 1 + (keys is not None), progress)
    rates: dict[str, float] = {}
    for repeat in range(config.repeats):
        for key, (label, factory) in loaders.items():
            bar.step(f"{label} ({repeat + 1}/{config.repeats})")
            if key == "dali":
                rows[key].runs.append(_dali_run(config, workers))
                continue
            if factory is None:
                rates = _decode_run(rows[key], files, config.seconds)
                continue
            with factory() as stream:
                # The cached row is timed once its first epoch has filled the cache.
                warmup = _WARMUP_BATCHES + (stream.batches_per_epoch if key == "stoker_cached" else 0)
                rows[key].runs.append(timed_window(stream, seconds=config.seconds, warmup_batches=warmup))
    bar.step("wire path, 256 x 224 x 224 x 3 batches")
    gb_per_s = wire_rate(min(config.seconds, 5.0))
    curve_gb_per_s = None
    if keys is not None:
        bar.step("wire path with CURVE")
        curve_gb_per_s = wire_rate(min(config.seconds, 5.0), keys=keys)
    bar.finish()
    cores = min(usable_cores(), workers)
    return {
        "config": {**vars(config), "data": str(config.data), "files": len(files), "cores": cores},
        "rows": {key: row.as_dict() for key, row in rows.items()},
        "decoders_1core_images_per_s": rates,
        "ratios": ratios(rows, cores),
        "wire_gb_per_s": gb_per_s,
        "wire_curve_gb_per_s": curve_gb_per_s,
        "stoker_stages_ms": stages,
    }
