"""``stoker demo``: a real server and a real client on the photos shipped with stoker.

Starts ``stoker serve`` on the bundled demo dataset (port 0, loopback), streams epochs through
``RemoteBatches`` the way a training loop would, and reports images/s, MB/s and the data-stall share;
then, for scale, runs torch's plain ``DataLoader`` recipe on the same photos on the same cores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEMO_DATA", "DemoResult", "stream_stoker", "run_dataloader_baseline"]

DEMO_DATA = Path(__file__).resolve().parent / "demo-data"


@dataclass(frozen=True)
class DemoResult:
    """What one streaming run measured."""

    label: str
    images: int
    seconds: float
    nbytes: int
    stall_share: float | None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


def stream_stoker(
    endpoint: str, epochs: int, batch_size: int, image_size: int, step_s: float, device: str | None
) -> DemoResult:
    """Iterate ``epochs`` epochs of the demo dataset from a running server."""
    import torch

    from stoker.client import RemoteBatches

    with RemoteBatches(
        endpoint, "demo", batch_size=batch_size, image_size=image_size, device=device, timeout_s=60.0
    ) as batches:
        len(batches)  # connect and open the job before the clock starts
        started = time.perf_counter()
        for _ in range(epochs):
            for images, _labels in batches:
                if step_s:
                    _simulated_step(images, step_s)
                if images.device.type == "cuda":
                    torch.cuda.synchronize(images.device)
        seconds = time.perf_counter() - started
        stats = batches.stats()
    return DemoResult("stoker", int(stats["images"]), seconds, int(stats["bytes"]), float(stats["wait_share"]))


def _simulated_step(images: object, step_s: float) -> None:
    # Stands in for forward/backward: the data-stall share is only meaningful next to real work.
    deadline = time.perf_counter() + step_s
    while time.perf_counter() < deadline:
        pass


def run_dataloader_baseline(data: Path, epochs: int, batch_size: int, image_size: int, workers: int) -> DemoResult:
    """torch's seed recipe: ImageFolder + Resize((S, S)) + ToTensor + Normalize with ``workers`` workers."""
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
    images = nbytes = 0
    iterator_ready = iter(loader)  # start the workers before the clock, as stoker's server is started
    started = time.perf_counter()
    for epoch in range(epochs):
        for batch, _ in iterator_ready if epoch == 0 else loader:
            images += batch.shape[0]
            nbytes += batch.numel() * batch.element_size()
    seconds = time.perf_counter() - started
    return DemoResult("torch DataLoader (seed recipe)", images, seconds, nbytes, None)
