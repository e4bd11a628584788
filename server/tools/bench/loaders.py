"""The loaders ``stoker bench`` compares, each as an endless ``(images, bytes)`` stream on the same data.

- ``dataloader_seed``: the recipe most people start from: ``ImageFolder`` + ``Resize((S, S))`` +
  ``ToTensor`` + ``Normalize``, float32 out.
- ``dataloader_strong``: a ``DataLoader`` doing stoker's work: ``torchvision.io.decode_jpeg`` + v2
  ``RandomResizedCrop`` + flip (``train``) or ``Resize`` + ``CenterCrop`` (``eval``), uint8 out.
- ``stoker``: a real ``stoker serve`` child and a ``RemoteBatches`` client over loopback.

Both DataLoaders use ``persistent_workers`` so epoch boundaries cost them no worker restarts.
"""

from __future__ import annotations

import threading
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms
from torchvision.transforms import v2

from stoker.server.tools.launcher import loopback_args, start_server

__all__ = ["seed_recipe", "strong_recipe", "stoker_stream"]


def _endless(loader: DataLoader) -> Iterator[tuple[int, int]]:
    while True:
        for images, _ in loader:
            yield images.shape[0], images.numel() * images.element_size()


@contextmanager
def seed_recipe(data: Path, size: int, batch_size: int, workers: int) -> Iterator[Iterator[tuple[int, int]]]:
    """ImageFolder + Resize((S, S)) + ToTensor + Normalize."""
    transform = transforms.Compose(
        [
            transforms.Resize((size, size)),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    dataset = datasets.ImageFolder(str(data), transform=transform)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0
    )
    yield _endless(loader)
    del loader


class _JpegFolder(Dataset):
    """ImageFolder's samples, decoded with libjpeg-turbo through torchvision."""

    def __init__(self, data: Path, transform: v2.Transform) -> None:
        self.samples = datasets.ImageFolder(str(data)).samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from torchvision.io import ImageReadMode, decode_image, read_file

        path, label = self.samples[index]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io is deprecated in 0.29
            image = decode_image(read_file(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
        return self.transform(image), label


@contextmanager
def strong_recipe(
    data: Path, size: int, batch_size: int, workers: int, pipeline: str
) -> Iterator[Iterator[tuple[int, int]]]:
    """decode_jpeg + v2 RandomResizedCrop + flip (or Resize + CenterCrop), uint8 out."""
    if pipeline == "train":
        transform = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
    elif pipeline == "eval":
        transform = v2.Compose([v2.Resize(int(size * 256 / 224), antialias=True), v2.CenterCrop(size)])
    else:
        transform = v2.Resize((size, size), antialias=True)
    loader = DataLoader(
        _JpegFolder(data, transform),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    yield _endless(loader)
    del loader


@contextmanager
def stoker_stream(
    data: Path,
    size: int,
    batch_size: int,
    workers: int,
    pipeline: str,
    poll_status_ms: float = 0.0,
    prefetch: int = 4,
) -> Iterator[Iterator[tuple[int, int]]]:
    """A real server (child process) and client; optionally a thread polling ``/status``."""
    from stoker.client import RemoteBatches

    args = loopback_args("bench", data, workers)
    with start_server(args) as server:
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(poll_status_ms / 1000):
                with urllib.request.urlopen(server.http + "/status", timeout=10) as response:
                    response.read()

        poller = threading.Thread(target=poll, daemon=True) if poll_status_ms > 0 else None
        with RemoteBatches(
            server.data,
            "bench",
            pipeline=pipeline,
            image_size=size,
            batch_size=batch_size,
            device="cpu",
            normalize=False,
            prefetch=prefetch,
            timeout_s=120,
        ) as batches:

            def endless() -> Iterator[tuple[int, int]]:
                while True:
                    for images, _ in batches:
                        yield images.shape[0], images.numel()

            if poller is not None:
                poller.start()
            try:
                yield endless()
            finally:
                stop.set()
                if poller is not None:
                    poller.join(10)
