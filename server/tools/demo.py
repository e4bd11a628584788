"""``stoker demo``: a real server and a real client on the photos shipped with stoker.

Starts ``stoker serve`` on the bundled demo dataset (port 0, loopback), streams epochs through
``RemoteBatches`` the way a training loop would, and reports images/s, MB/s and the data-stall share;
then, for scale, runs torch's plain ``DataLoader`` recipe on the same photos on the same cores. Each
loader is timed in ``repeats`` windows of ``epochs`` epochs and shown by its median window
(:mod:`stoker.server.tools.measure`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stoker.server.tools.measure import Series, Stream, timed_window

__all__ = ["DEMO_DATA", "DemoConfig", "run_demo", "format_demo"]

DEMO_DATA = Path(__file__).resolve().parent.parent / "demo-data"

_BASELINE_WORKERS = 2
"""DataLoader workers of the comparison: the small setup the seed recipe is usually run with."""


@dataclass(frozen=True)
class DemoConfig:
    """What ``stoker demo`` runs."""

    epochs: int = 2
    """Epochs per timed window."""
    repeats: int = 3
    """Timed windows per loader, one after another; the median one is shown."""
    batch_size: int = 16
    image_size: int = 224
    workers: int | None = None
    """Server workers (None or 0: the usable CPU cores)."""
    step_ms: float = 0.0
    """Simulated training step per batch."""
    device: str | None = None
    compare: bool = True
    """Also time torch's DataLoader seed recipe."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.repeats < 1:
            raise ValueError(
                f"--epochs and --repeats must be at least 1 (got epochs={self.epochs}, repeats={self.repeats})"
            )


def _windows(label: str, stream: Stream, config: DemoConfig) -> Series:
    # Windows run back to back on one loader: later ones continue with the next epochs.
    batches = config.epochs * stream.batches_per_epoch
    return Series(label, [timed_window(stream, batches=batches) for _ in range(config.repeats)])


def run_demo(config: DemoConfig, say: Callable[[str], None]) -> list[Series]:
    """Time stoker, then (with ``compare``) the DataLoader seed recipe; ``say`` gets progress lines."""
    from stoker.server.settings.host import usable_cores
    from stoker.server.tools.bench.loaders import seed_recipe, stoker_client
    from stoker.server.tools.launcher import loopback_args, start_server

    workers = config.workers or usable_cores()
    say(
        f"stoker demo: {sum(1 for _ in DEMO_DATA.rglob('*.jpg'))} photos in {DEMO_DATA}, "
        f"{config.epochs} epochs x {config.repeats} runs, batch {config.batch_size}, {config.image_size}px, "
        f"{workers} workers"
    )
    rows = []
    with start_server(loopback_args("demo", DEMO_DATA, workers)) as server:
        say(f"server up: data {server.data}, status {server.http}/status")
        with stoker_client(
            server.data,
            "demo",
            step_s=config.step_ms / 1000.0,
            batch_size=config.batch_size,
            image_size=config.image_size,
            device=config.device,
            timeout_s=60.0,
        ) as stream:
            rows.append(_windows("stoker", stream, config))
    if config.compare:
        with seed_recipe(DEMO_DATA, config.image_size, config.batch_size, _BASELINE_WORKERS) as stream:
            rows.append(_windows("torch DataLoader (seed recipe)", stream, config))
    return rows


def format_demo(config: DemoConfig, rows: list[Series]) -> str:
    """The table: each loader's median window, its range of images/s and, for stoker, the stall share."""
    lines = [
        "",
        f"{'loader':34s} {'images':>7s} {'images/s':>9s} {'(min - max)':>15s} {'MB/s':>8s} {'data stall':>10s}",
    ]
    for row in rows:
        run = row.median()
        stall = "-" if run.stall_share is None else f"{100 * run.stall_share:.0f}%"
        low, high = row.spread()
        spread = f"({low:.0f} - {high:.0f})"
        lines.append(
            f"{row.label:34s} {run.images:7d} {run.images_per_s:9.1f} {spread:>15s} {run.mb_per_s:8.1f} {stall:>10s}"
        )
    lines.append(f"images/s: median of {config.repeats} runs of {config.epochs} epochs each (range in brackets)")
    if len(rows) == 2 and rows[1].median().images_per_s > 0:
        ratio = rows[0].median().images_per_s / rows[1].median().images_per_s
        lines += [
            "",
            f"stoker / DataLoader: {ratio:.2f}x images/s (stoker ships uint8 and normalises on the client's device)",
        ]
    if config.step_ms == 0:
        lines.append("data stall is the share of the loop spent waiting; with --step-ms 0 the loop does nothing else")
    return "\n".join(lines)
