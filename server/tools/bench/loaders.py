"""The loaders ``stoker bench`` and ``stoker demo`` time, each as a :class:`Stream` on the same data.

- ``seed_recipe``: the recipe most people start from: ``ImageFolder`` + ``Resize((S, S))`` +
  ``ToTensor`` + ``Normalize``, float32 out. The one DataLoader baseline of both commands.
- ``strong_recipe``: a ``DataLoader`` doing stoker's work: ``torchvision.io.decode_jpeg`` + the
  pipeline's torchvision form (:mod:`.recipes`): v2 ``RandomResizedCrop`` + flip (``train``),
  ``Resize`` + ``CenterCrop`` (``eval``), and any post-ops and views, uint8 out.
- ``stoker_client``: a ``RemoteBatches`` client of a running server; ``stoker_stream`` starts a real
  ``stoker serve`` child on loopback for it.

Both DataLoaders use ``persistent_workers`` so epoch boundaries cost them no worker restarts.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

from stoker.server.imaging.pipelines import Pipeline
from stoker.server.tools.bench.recipes import recipe_transform
from stoker.server.tools.launcher import loopback_args, start_server
from stoker.server.tools.measure import Stream

__all__ = ["JpegFolder", "seed_recipe", "strong_recipe", "stoker_client", "stoker_stream"]


@contextmanager
def _loader_stream(loader: DataLoader) -> Iterator[Stream]:
    # Start the workers now, before any clock, as stoker's server is started before it is timed.
    first = iter(loader)

    def counts() -> Iterator[tuple[int, int]]:
        epoch: Iterable[Any] = first
        while True:
            for images, _ in epoch:
                yield _count(images)
            epoch = loader

    endless = counts()
    try:
        yield Stream(endless, len(loader))
    finally:
        endless.close()  # lets go of the loader: its persistent workers stop when it is collected


def _count(images: torch.Tensor | list[torch.Tensor]) -> tuple[int, int]:
    """``(samples, bytes)`` of a batch: one tensor, or one per view of a multi-view pipeline."""
    views = images if isinstance(images, list) else [images]
    return views[0].shape[0], sum(view.numel() * view.element_size() for view in views)


@contextmanager
def seed_recipe(data: Path, size: int, batch_size: int, workers: int) -> Iterator[Stream]:
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
    with _loader_stream(loader) as stream:
        yield stream


class JpegFolder(Dataset):
    """ImageFolder's samples, decoded with libjpeg-turbo through torchvision."""

    def __init__(self, data: Path, transform: Callable[[torch.Tensor], Any]) -> None:
        self.samples = datasets.ImageFolder(str(data)).samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        return self.transform(self.decode(path)), label

    def decode(self, path: str) -> Any:
        """The image at ``path`` as the transform takes it: a ``3 x H x W`` ``uint8`` tensor."""
        from torchvision.io import ImageReadMode, decode_image, read_file

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io is deprecated in 0.29
            return decode_image(read_file(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)


@contextmanager
def strong_recipe(data: Path, size: int, batch_size: int, workers: int, pipeline: Pipeline) -> Iterator[Stream]:
    """decode_jpeg + the pipeline's torchvision form, uint8 out."""
    loader = DataLoader(
        JpegFolder(data, recipe_transform(pipeline, size)),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    with _loader_stream(loader) as stream:
        yield stream


@contextmanager
def stoker_client(endpoint: str, dataset: str, step_s: float = 0.0, **options: Any) -> Iterator[Stream]:
    """A ``RemoteBatches(endpoint, dataset, **options)`` client of a running server. Each batch is
    followed by ``step_s`` of busy work standing in for a training step, and, on a GPU, waits for its
    copy to land, so a window times what a training loop would see. Bytes are the uint8 pixels shipped.
    """
    from stoker.client import RemoteBatches

    with RemoteBatches(endpoint, dataset, **options) as batches:
        per_epoch = len(batches)  # connects and opens the job before any clock starts

        def counts() -> Iterator[tuple[int, int]]:
            while True:
                for images, _ in batches:
                    if step_s:
                        _busy(step_s)
                    first = images[0] if isinstance(images, list) else images
                    if first.device.type == "cuda":
                        torch.cuda.synchronize(first.device)
                    yield _count(images)

        endless = counts()
        try:
            yield Stream(endless, per_epoch, lambda: float(batches.stats()["wait_s"]))
        finally:
            endless.close()


def _busy(seconds: float) -> None:
    # Spins rather than sleeps: a training step keeps its core busy.
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


@contextmanager
def stoker_stream(
    data: str,
    size: int,
    batch_size: int,
    workers: int,
    pipeline: str,
    poll_status_ms: float = 0.0,
    prefetch: int = 4,
    server_args: Sequence[str] = (),
    client_keys: dict[str, str] | None = None,
    stages: dict[str, float] | None = None,
    dataset: str = "bench",
    env: dict[str, str] | None = None,
    targets: Sequence[str] | None = None,
) -> Iterator[Stream]:
    """A real server (child process, given ``server_args`` and ``env`` too) and a CPU client of uint8
    batches of ``dataset`` (or a mixture the server declares); optionally a thread polling ``/status``;
    ``stages`` gets the server's mean milliseconds per stage (and per post-op: ``op:<pipeline>/<op>``)
    from ``/status`` when the stream ends."""
    args = loopback_args("bench", data, workers) + list(server_args)
    with start_server(args, env=None if env is None else {**os.environ, **env}) as server:
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(poll_status_ms / 1000):
                with urllib.request.urlopen(server.http + "/status", timeout=10) as response:
                    response.read()

        poller = threading.Thread(target=poll, daemon=True) if poll_status_ms > 0 else None
        with stoker_client(
            server.data,
            dataset,
            pipeline=pipeline,
            image_size=size,
            batch_size=batch_size,
            device="cpu",
            normalize=False,
            # The wire's NHWC seen as NCHW, with no host copy: turning it contiguous is the trainer's
            # device's work (on a GPU, after the copy), which a CPU benchmark should not charge here.
            memory_format=torch.channels_last,
            prefetch=prefetch,
            timeout_s=120,
            **(client_keys or {}),
            **({"targets": list(targets)} if targets else {}),
        ) as stream:
            if poller is not None:
                poller.start()
            try:
                yield stream
            finally:
                stop.set()
                if stages is not None:
                    with urllib.request.urlopen(server.http + "/status", timeout=10) as response:
                        status = json.loads(response.read())
                    stages.update({name: figures["mean_ms"] for name, figures in status["stages"].items()})
                if poller is not None:
                    poller.join(10)
