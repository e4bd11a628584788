"""``stoker bench``: stoker against torch's DataLoader on the same data and cores, in one run.

Rows, run one after another and repeated (interleaved, so drift hits all alike):

- (a) ``dataloader_seed``: the plain DataLoader recipe (float32 out)
- (b) ``dataloader_strong``: a DataLoader doing stoker's work (uint8 out)
- (c) ``decode_1core``: the fastest decoder here on one core: the per-core limit
- (d) ``stoker``: a real server and client over loopback (uint8 out)

plus the wire path alone (GB/s). Reported: images/s (median and range), MB/s, CPU-seconds per
1,000 images (the whole process tree), (d)/(a), (d)/(b) and (d) / (cores x (c)). Each row is
reported by its median run (:mod:`stoker.server.tools.measure`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stoker.server.tools.measure import Run, Series, timed_window

__all__ = ["BenchConfig", "run_bench", "format_table", "dump_json"]

_WARMUP_BATCHES = 2
"""Skipped at the start of every run: the first requests, page faults and thread pools."""


@dataclass(frozen=True)
class BenchConfig:
    """What to run."""

    data: Path
    pipeline: str = "train"
    image_size: int = 224
    batch_size: int = 64
    workers: int | None = None
    """Workers for every loader (None or 0: the usable CPU cores)."""
    seconds: float = 10.0
    repeats: int = 3
    poll_status_ms: float = 0.0
    """Also run stoker with ``/status`` polled this often (0: don't)."""

    def __post_init__(self) -> None:
        if not self.data.is_dir():
            raise ValueError(f"--data {self.data} is not a directory")
        if not self.seconds > 0:
            raise ValueError(f"--seconds must be > 0, not {self.seconds}")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be at least 1, not {self.repeats}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers must be >= 0, not {self.workers}")


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


def run_bench(config: BenchConfig, progress: bool = True) -> dict[str, Any]:
    """Run every row ``repeats`` times; return the results as a JSON-ready dict."""
    from stoker.server.settings.host import usable_cores
    from stoker.server.tools.bench.decode_rate import single_core_rates
    from stoker.server.tools.bench.loaders import seed_recipe, stoker_stream, strong_recipe
    from stoker.server.tools.bench.wire_rate import wire_rate

    workers = config.workers or usable_cores()
    config = replace(config, workers=workers)  # the report shows the count used
    files = sorted(p for p in config.data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise ValueError(f"no JPEG files under {config.data}")
    rows = {
        "dataloader_seed": Series("(a) DataLoader seed recipe"),
        "dataloader_strong": Series("(b) DataLoader, stoker's work"),
        "decode_1core": Series("(c) decode, 1 core"),
        "stoker": Series("(d) stoker end to end"),
    }
    if config.poll_status_ms:
        rows["stoker_polled"] = Series(f"(d) + /status every {config.poll_status_ms:g} ms")
    streams = {
        "dataloader_seed": lambda: seed_recipe(config.data, config.image_size, config.batch_size, workers),
        "dataloader_strong": lambda: strong_recipe(
            config.data, config.image_size, config.batch_size, workers, config.pipeline
        ),
        "stoker": lambda: stoker_stream(config.data, config.image_size, config.batch_size, workers, config.pipeline),
        "stoker_polled": lambda: stoker_stream(
            config.data,
            config.image_size,
            config.batch_size,
            workers,
            config.pipeline,
            poll_status_ms=config.poll_status_ms,
        ),
    }
    bar = _Progress(config.repeats * len(rows) + 1, progress)
    rates: dict[str, float] = {}
    for repeat in range(config.repeats):
        for key, row in rows.items():
            bar.step(f"{row.label} ({repeat + 1}/{config.repeats})")
            if key == "decode_1core":
                rates = single_core_rates(files, config.seconds)
                best = max(rates, key=rates.__getitem__)
                row.note = best
                # One core, busy all along: its CPU seconds are its wall seconds.
                images = int(rates[best] * config.seconds)
                row.runs.append(Run(images, nbytes=0, wall_s=config.seconds, cpu_s=config.seconds))
                continue
            with streams[key]() as stream:
                row.runs.append(timed_window(stream, seconds=config.seconds, warmup_batches=_WARMUP_BATCHES))
    bar.step("wire path, 256 x 224 x 224 x 3 batches")
    gb_per_s = wire_rate(min(config.seconds, 5.0))
    bar.finish()
    cores = min(usable_cores(), max(workers, 1))
    d, a, b, c = (
        rows[key].median().images_per_s for key in ("stoker", "dataloader_seed", "dataloader_strong", "decode_1core")
    )
    result: dict[str, Any] = {
        "config": {**vars(config), "data": str(config.data), "files": len(files), "cores": cores},
        "rows": {key: row.as_dict() for key, row in rows.items()},
        "decoders_1core_images_per_s": rates,
        "ratios": {
            "stoker_vs_seed": d / a if a else None,
            "stoker_vs_strong": d / b if b else None,
            "stoker_vs_cores_x_decode": d / (cores * c) if c else None,
        },
        "wire_gb_per_s": gb_per_s,
    }
    if config.poll_status_ms:
        polled = rows["stoker_polled"].median().images_per_s
        result["ratios"]["status_polling_overhead"] = 1 - polled / d if d else None
    return result


def format_table(result: dict[str, Any]) -> str:
    """The human-readable table."""
    config = result["config"]
    lines = [
        f"stoker bench: {config['files']} JPEGs in {config['data']}, pipeline {config['pipeline']}, "
        f"{config['image_size']}px, batch {config['batch_size']}, {config['workers']} workers, "
        f"{config['seconds']:g} s x {config['repeats']} repeats",
        "",
        f"{'loader':36s} {'images/s':>9s} {'(min - max)':>17s} {'MB/s':>8s} {'CPU-s/1k img':>12s}",
    ]
    for row in result["rows"].values():
        ips = row["images_per_s"]
        spread = f"({ips['min']:.0f} - {ips['max']:.0f})"
        cpu = f"{row['cpu_s_per_1000_images']:.2f}" if row["mb_per_s"] else "1 core"
        mb = f"{row['mb_per_s']:.1f}" if row["mb_per_s"] else "-"
        lines.append(f"{row['label']:36s} {ips['median']:9.1f} {spread:>17s} {mb:>8s} {cpu:>12s}")
    ratios = result["ratios"]
    fastest = result["rows"]["decode_1core"]["note"]

    def show(value: float | None, suffix: str = "x") -> str:
        return "-" if value is None else f"{value:.2f}{suffix}"

    share = ratios["stoker_vs_cores_x_decode"]
    lines += [
        "",
        f"(d) / (a) = {show(ratios['stoker_vs_seed'])}    (d) / (b) = {show(ratios['stoker_vs_strong'])}    "
        f"(d) / ({config['cores']} cores x (c)) = {show(None if share is None else 100 * share, '%')}",
        f"(c) is {fastest}; all decoders, 1 core: "
        + ", ".join(f"{name} {rate:.0f}/s" for name, rate in result["decoders_1core_images_per_s"].items()),
        f"wire path alone (256 x 224 x 224 x 3 uint8 batches over loopback): {result['wire_gb_per_s']:.2f} GB/s",
    ]
    if "status_polling_overhead" in ratios and ratios["status_polling_overhead"] is not None:
        lines.append(f"/status polling overhead on (d): {100 * ratios['status_polling_overhead']:.1f}%")
    return "\n".join(lines)


def dump_json(result: dict[str, Any]) -> str:
    """The result as JSON for scripts."""
    return json.dumps(result, indent=2, default=str)
