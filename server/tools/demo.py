"""``stoker demo``: a real server and a real client on the photos shipped with stoker.

Starts ``stoker serve`` on the bundled demo dataset (port 0, loopback), streams epochs through
``RemoteBatches`` the way a training loop would, and reports images/s, MB/s and the data-stall share;
then, for scale, runs torch's plain ``DataLoader`` recipe on the same photos on the same cores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEMO_DATA", "DemoResult", "Window", "stream_stoker", "run_dataloader_baseline"]

DEMO_DATA = Path(__file__).resolve().parent.parent / "demo-data"


@dataclass(frozen=True)
class Window:
    """One timed stretch of ``epochs`` epochs."""

    images: int
    seconds: float
    nbytes: int
    waited_s: float | None = None
    """Seconds the loop spent waiting for data (stoker's client counts it; the DataLoader does not)."""

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class DemoResult:
    """What one loader measured: several windows of the same length, reported by their median.

    Two epochs of 48 photos take a fraction of a second, so a single window is mostly start-up noise
    (first requests, thread pools, page faults); the median of a few is what a longer run sees.
    """

    label: str
    windows: tuple[Window, ...]

    @property
    def median(self) -> Window:
        """The window with the median rate (the lower middle one for an even count), so every figure
        shown for a loader comes from one and the same window."""
        ranked = sorted(self.windows, key=lambda window: window.images_per_s)
        return ranked[(len(ranked) - 1) // 2]

    @property
    def images(self) -> int:
        return self.median.images

    @property
    def images_per_s(self) -> float:
        return self.median.images_per_s

    @property
    def spread(self) -> tuple[float, float]:
        rates = [window.images_per_s for window in self.windows]
        return min(rates), max(rates)

    @property
    def mb_per_s(self) -> float:
        window = self.median
        return window.nbytes / window.seconds / 1e6 if window.seconds > 0 else 0.0

    @property
    def stall_share(self) -> float | None:
        window = self.median
        if window.waited_s is None or window.seconds <= 0:
            return None
        return min(1.0, window.waited_s / window.seconds)


def stream_stoker(
    endpoint: str,
    epochs: int,
    batch_size: int,
    image_size: int,
    step_s: float,
    device: str | None,
    repeats: int = 1,
) -> DemoResult:
    """Iterate ``repeats`` windows of ``epochs`` epochs of the demo dataset from a running server,
    one client throughout (later windows continue with the next epochs)."""
    import torch

    from stoker.client import RemoteBatches

    windows = []
    with RemoteBatches(
        endpoint, "demo", batch_size=batch_size, image_size=image_size, device=device, timeout_s=60.0
    ) as batches:
        len(batches)  # connect and open the job before the clock starts
        for _ in range(repeats):
            before = batches.stats()
            started = time.perf_counter()
            for _ in range(epochs):
                for images, _labels in batches:
                    if step_s:
                        _simulated_step(images, step_s)
                    if images.device.type == "cuda":
                        torch.cuda.synchronize(images.device)
            seconds = time.perf_counter() - started
            after = batches.stats()
            windows.append(
                Window(
                    int(after["images"] - before["images"]),
                    seconds,
                    int(after["bytes"] - before["bytes"]),
                    float(after["wait_s"] - before["wait_s"]),
                )
            )
    return DemoResult("stoker", tuple(windows))


def _simulated_step(images: object, step_s: float) -> None:
    # Stands in for forward/backward: the data-stall share is only meaningful next to real work.
    deadline = time.perf_counter() + step_s
    while time.perf_counter() < deadline:
        pass


def run_dataloader_baseline(
    data: Path, epochs: int, batch_size: int, image_size: int, workers: int, repeats: int = 1
) -> DemoResult:
    """torch's seed recipe: ImageFolder + Resize((S, S)) + ToTensor + Normalize with ``workers``
    workers, timed in the same windows as :func:`stream_stoker`."""
    import torch
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [
            transforms.Resize((image_size, image_size)),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    dataset = datasets.ImageFolder(str(data), transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0
    )
    windows = []
    first = iter(loader)  # start the workers before the clock, as stoker's server is started
    for repeat in range(repeats):
        images = nbytes = 0
        started = time.perf_counter()
        for epoch in range(epochs):
            for batch, _ in first if repeat == 0 and epoch == 0 else loader:
                images += batch.shape[0]
                nbytes += batch.numel() * batch.element_size()
        windows.append(Window(images, time.perf_counter() - started, nbytes))
    return DemoResult("torch DataLoader (seed recipe)", tuple(windows))
