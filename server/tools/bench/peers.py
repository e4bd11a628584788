"""Peer loaders for the augmentation-heavy rows of ``stoker bench`` (issue 20):

- ``albumentations_recipe``: a ``DataLoader`` running the pipeline written with ``albumentations``
  (the CPU augmentation library users pick; pinned to 2.0.8, the last MIT release: its successor
  AlbumentationsX is AGPL), decoding with OpenCV into ``H x W x 3`` as albumentations expects.
- ``dali_run``: NVIDIA DALI's CPU pipeline for the DINO multi-crop recipe
  (``../shared/peers/dali_dino.py``), run by an external Python (DALI lives in its own venv); its
  ``img_per_s=`` line is the figure, CPU seconds are the child's.
"""

from __future__ import annotations

import re
import resource
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from stoker.server.imaging.pipelines import TORCHVISION_PREFIX, OpSpec, Pipeline, View
from stoker.server.tools.bench.loaders import JpegFolder
from stoker.server.tools.measure import Run, Stream

__all__ = ["albumentations_transform", "albumentations_recipe", "dali_run", "DALI_DINO"]

DALI_DINO = Path(__file__).resolve().parents[4] / "shared" / "peers" / "dali_dino.py"
"""The DALI peer script next to the project (``../shared/peers`` from the repository root)."""


def _op(op: OpSpec, p: float = 1.0) -> Any:
    """The albumentations form of one torchvision post-op (applied with probability ``p``)."""
    import albumentations as A

    name, kw = op.op[len(TORCHVISION_PREFIX) :], op.arguments()
    if name == "RandomApply":
        children = [_op(child) for child in op.children]
        chance = p * float(kw.get("p", 0.5))
        return _with_p(children[0], chance) if len(children) == 1 else A.Sequential(children, p=chance)
    if name == "ColorJitter":
        return A.ColorJitter(
            brightness=kw.get("brightness", 0), contrast=kw.get("contrast", 0),
            saturation=kw.get("saturation", 0), hue=kw.get("hue", 0), p=p,
        )  # fmt: skip
    if name == "RandomGrayscale":
        return A.ToGray(num_output_channels=3, p=p * float(kw.get("p", 0.1)))
    if name == "GaussianBlur":
        size = kw["kernel_size"] if isinstance(kw["kernel_size"], int) else kw["kernel_size"][0]
        sigma = kw.get("sigma", (0.1, 2.0))
        sigma = (sigma, sigma) if isinstance(sigma, (int, float)) else tuple(sigma)
        return A.GaussianBlur(blur_limit=(size, size), sigma_limit=sigma, p=p)
    if name == "RandomSolarize":
        threshold = float(kw["threshold"]) / 255.0
        return A.Solarize(threshold_range=(threshold, threshold), p=p * float(kw.get("p", 0.5)))
    raise ValueError(f"no albumentations form for {op.label}")


def _with_p(transform: Any, p: float) -> Any:
    transform.p = p
    return transform


def _view(view: View, size: int) -> Any:
    import albumentations as A

    if view.geometry == "random_resized_crop":
        steps: list[Any] = [A.RandomResizedCrop(size=(size, size), scale=view.scale, ratio=view.ratio)]
    elif view.geometry == "resize_center_crop":
        steps = [A.SmallestMaxSize(max_size=int(size * view.resize_ratio)), A.CenterCrop(size, size)]
    else:
        steps = [A.Resize(size, size)]
    if view.hflip > 0:
        steps.append(A.HorizontalFlip(p=view.hflip))
    steps += [_op(op) for op in view.post_ops]
    return A.Compose(steps)


def albumentations_transform(pipeline: Pipeline, image_size: int) -> Callable[[np.ndarray], Any]:
    """An ``H x W x 3`` image to what stoker's client yields for ``pipeline`` (a tensor per view);
    raises ``ValueError`` for an op without an albumentations form."""
    sizes = pipeline.sizes(image_size)
    composes = [_view(view, size) for view, size in zip(pipeline.expanded, sizes, strict=True)]

    def apply(image: np.ndarray) -> Any:
        views = [torch.from_numpy(compose(image=image)["image"]).permute(2, 0, 1) for compose in composes]
        return views if pipeline.multi_view else views[0]

    return apply


class _HwcFolder(JpegFolder):
    """ImageFolder's samples decoded by OpenCV (libjpeg-turbo) to RGB ``H x W x 3``, as albumentations
    expects."""

    def decode(self, path: str) -> np.ndarray:
        import cv2

        return cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _set_up_worker(_: int) -> None:
    import cv2

    cv2.setNumThreads(1)  # one thread per worker, as stoker's


@contextmanager
def albumentations_recipe(data: Path, size: int, batch_size: int, workers: int, pipeline: Pipeline) -> Iterator[Stream]:
    """OpenCV decode + the pipeline's albumentations form, uint8 out."""
    from stoker.server.tools.bench.loaders import _loader_stream

    loader = DataLoader(
        _HwcFolder(data, albumentations_transform(pipeline, size)),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=_set_up_worker,
    )
    with _loader_stream(loader) as stream:
        yield stream


_RATE = re.compile(r"images=(\d+) seconds=([0-9.]+) img_per_s=")


def dali_run(
    python: str,
    data: Path,
    workers: int,
    batch_size: int,
    sample_nbytes: int,
    script: Path = DALI_DINO,
    epochs: int = 3,
    timeout_s: float = 1800,
) -> Run:
    """One run of DALI's DINO pipeline (its timed epochs, after its warm-up one) under ``python``;
    ``sample_nbytes``: the bytes of one sample's views, as stoker's rows count them."""
    if not script.is_file():
        raise ValueError(f"the DALI peer script is not at {script}")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [python, str(script), str(data), "--epochs", str(epochs), "--threads", str(workers), "--batch",
         str(batch_size)],
        capture_output=True, text=True, timeout=timeout_s, check=False,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    found = _RATE.search(done.stdout)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{python} {script} failed ({done.returncode}): {done.stderr[-2000:]}")
    images, seconds = int(found.group(1)), float(found.group(2))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    # The child's CPU covers its warm-up epoch too: charge the timed share of it.
    return Run(images, nbytes=images * sample_nbytes, wall_s=seconds, cpu_s=cpu * seconds / max(elapsed, seconds))
