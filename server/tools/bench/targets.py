"""``stoker bench --targets detection|captions``: stoker carrying targets against the usual loaders.

From a folder of JPEGs the bench writes, in a temporary folder, either a COCO instances file with four
known boxes per image (``detection``) or image-text tar shards, ``.jpg`` + ``.txt`` + ``.json`` per key
(``captions``). Rows, on the same data, workers and pipeline:

- ``dataloader_strong``: detection: a ``DataLoader`` decoding with ``torchvision.io`` and running the
  pipeline's torchvision v2 form on the image and its ``tv_tensors.BoundingBoxes`` together
  (``letterbox`` as ``Resize`` + ``Pad``), boxes clamped and sanitised; captions: ``webdataset``'s
  own pipeline, ``WebDataset(...).decode("torchrgb8").to_tuple("jpg", "txt")`` + the same crop, batched,
  in a ``DataLoader`` with the same workers;
- ``stoker``: the same job with ``targets`` (boxes, or captions);
- ``stoker_no_targets``: the same job without targets: what carrying them costs per sample.
"""

from __future__ import annotations

import io
import json
import math
import random
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from stoker.server.imaging.pipelines import Pipeline, View
from stoker.server.tools.measure import Stream

__all__ = ["TARGET_MODES", "prepare", "detection_loader", "captions_loader"]

TARGET_MODES = ("detection", "captions")
DATASET = "bench_targets"
_BOXES_PER_IMAGE = 4


def _jpegs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))


def _coco(folder: Path, out: Path) -> Path:
    from PIL import Image

    rng = random.Random(0)
    images, annotations = [], []
    for number, photo in enumerate(_jpegs(folder)):
        with Image.open(photo) as image:
            width, height = image.size
        images.append({"id": number, "file_name": str(photo.relative_to(folder)), "width": width, "height": height})
        for _ in range(_BOXES_PER_IMAGE):
            w, h = rng.uniform(0.1, 0.5) * width, rng.uniform(0.1, 0.5) * height
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            box = [round(x, 1), round(y, 1), round(w, 1), round(h, 1)]
            annotations.append(
                {"id": len(annotations), "image_id": number, "bbox": box, "category_id": rng.randint(1, 80)}
            )
    path = out / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": []}))
    return path


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _shards(folder: Path, out: Path, per_shard: int = 256) -> str:
    photos = _jpegs(folder)
    count = max(1, math.ceil(len(photos) / per_shard))
    for shard in range(count):
        with tarfile.open(out / f"pairs-{shard:04d}.tar", "w") as archive:
            for number, photo in enumerate(photos[shard * per_shard : (shard + 1) * per_shard], shard * per_shard):
                key = f"{number:08d}"
                caption = f"a photograph of {photo.stem.replace('_', ' ')}, sample {number}"
                _add(archive, f"{key}.jpg", photo.read_bytes())
                _add(archive, f"{key}.txt", caption.encode())
                _add(archive, f"{key}.json", json.dumps({"source": photo.name, "n": number}).encode())
    return str(out / f"pairs-{{0000..{count - 1:04d}}}.tar")


@contextmanager
def prepare(mode: str, folder: Path, config_file: Path | None) -> Iterator[tuple[Path, str, list[str]]]:
    """A server config declaring the bench's dataset with targets (and ``config_file``'s pipelines):
    ``(config, data path for the baseline, targets the client asks for)``."""
    if mode not in TARGET_MODES:
        raise ValueError(f"--targets {mode!r} must be one of {TARGET_MODES}")
    with tempfile.TemporaryDirectory(prefix="stoker-bench-targets-") as temporary:
        out = Path(temporary)
        base = config_file.read_text() if config_file is not None else ""
        if mode == "detection":
            data = str(_coco(folder, out))
            table = (
                f'[datasets.{DATASET}]\nkind = "coco"\npath = {json.dumps(data)}\nroot = {json.dumps(str(folder))}\n'
            )
            targets = ["boxes"]
        else:
            data = _shards(folder, out)
            table = f'[datasets.{DATASET}]\npath = {json.dumps(data)}\ntargets = {{caption = "txt"}}\n'
            targets = ["caption"]
        config = out / "bench.toml"
        config.write_text(base + "\n" + table)
        yield config, data, targets


def _geometry_v2(view: View, size: int) -> list[Any]:
    """The view's geometry and flip as torchvision v2 transforms (of images and boxes alike)."""
    from torchvision.transforms import v2

    if view.geometry == "random_resized_crop":
        steps: list[Any] = [v2.RandomResizedCrop(size, scale=view.scale, ratio=view.ratio, antialias=True)]
    elif view.geometry == "resize_center_crop":
        steps = [v2.Resize(int(size * view.resize_ratio), antialias=True), v2.CenterCrop(size)]
    elif view.geometry == "letterbox":
        steps = [_Letterbox(size, view.fill)]
    else:
        steps = [v2.Resize((size, size), antialias=True)]
    if view.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(view.hflip))
    return steps


class _Letterbox:
    """YOLO's letterbox with torchvision v2 functionals, on an image and its boxes together."""

    def __init__(self, size: int, fill: int) -> None:
        self.size, self.fill = size, fill

    def __call__(self, *inputs: Any) -> Any:
        from torchvision.transforms.v2 import functional as F

        image = inputs[0]
        height, width = image.shape[-2:]
        scale = self.size / max(width, height)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        top, left = (self.size - new_h) // 2, (self.size - new_w) // 2
        padding = [left, top, self.size - new_w - left, self.size - new_h - top]
        out = []
        for item in inputs:
            if isinstance(item, dict):
                out.append({**item, "boxes": F.pad(F.resize(item["boxes"], [new_h, new_w]), padding)})
            else:
                out.append(F.pad(F.resize(item, [new_h, new_w], antialias=True), padding, fill=self.fill))
        return tuple(out) if len(out) > 1 else out[0]


class _CocoDetection(torch.utils.data.Dataset):
    """COCO images decoded with ``torchvision.io``; the pipeline's v2 form on image + boxes."""

    def __init__(self, instances: Path, root: Path, pipeline: Pipeline, size: int) -> None:
        from torchvision.transforms import v2

        from stoker.server.imaging.postops import build_op

        document = json.loads(instances.read_text())
        boxes: dict[int, list[list[float]]] = {}
        labels: dict[int, list[int]] = {}
        for annotation in document["annotations"]:
            boxes.setdefault(annotation["image_id"], []).append(annotation["bbox"])
            labels.setdefault(annotation["image_id"], []).append(annotation["category_id"])
        self.samples = [
            (root / image["file_name"], boxes.get(image["id"], []), labels.get(image["id"], []))
            for image in document["images"]
        ]
        view = pipeline.expanded[0]
        steps = [*_geometry_v2(view, size), *(build_op(op) for op in view.post_ops)]
        self.transform = v2.Compose([*steps, v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes()])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from torchvision import tv_tensors
        from torchvision.io import ImageReadMode, decode_image, read_file

        path, boxes, labels = self.samples[index]
        image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB, apply_exif_orientation=True)
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYWH", canvas_size=image.shape[-2:]
            ),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }
        target["boxes"] = tv_tensors.wrap(
            __import__("torchvision").ops.box_convert(target["boxes"], "xywh", "xyxy"),
            like=target["boxes"],
            format="XYXY",
        )
        image, target = self.transform(tv_tensors.Image(image), target)
        return image.as_subclass(torch.Tensor), target


def _collate(batch: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[torch.Tensor, list]:
    return torch.stack([image for image, _ in batch]), [target for _, target in batch]


def _counting(loader: Any, per_epoch: int) -> Stream:
    def counts() -> Iterator[tuple[int, int]]:
        while True:
            for images, _ in loader:
                yield images.shape[0], images.numel() * images.element_size()

    return Stream(counts(), per_epoch)


@contextmanager
def detection_loader(
    instances: Path, root: Path, pipeline: Pipeline, size: int, batch: int, workers: int
) -> Iterator[Stream]:
    """The DataLoader form of a detection pipeline (torchvision v2 + ``tv_tensors``), uint8 out."""
    from torch.utils.data import DataLoader

    dataset = _CocoDetection(instances, root, pipeline, size)
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=_collate,
    )
    stream = _counting(loader, len(loader))
    try:
        yield stream
    finally:
        stream.counts.close()  # type: ignore[attr-defined]


@contextmanager
def captions_loader(pattern: str, pipeline: Pipeline, size: int, batch: int, workers: int) -> Iterator[Stream]:
    """webdataset's own pipeline (``WebDataset(...).decode(...).to_tuple(...)`` + the same crop), batched,
    in a DataLoader with ``workers``; uint8 out."""
    import webdataset
    from torch.utils.data import DataLoader
    from torchvision.transforms import v2

    from stoker.server.data.shards import expand_pattern

    view = pipeline.expanded[0]
    crop = v2.Compose(_geometry_v2(view, size))
    shards = expand_pattern(pattern)
    dataset = (
        webdataset.WebDataset(shards, shardshuffle=False, empty_check=False)
        .shuffle(1000)
        .decode("torchrgb8")
        .to_tuple("jpg", "txt")
        .map_tuple(crop, lambda text: text)
        .batched(batch)
    )
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0)
    samples = 0
    for shard in shards:
        with tarfile.open(shard) as archive:
            samples += sum(1 for member in archive.getnames() if member.endswith(".jpg"))
    stream = _counting(loader, max(1, samples // batch))
    try:
        yield stream
    finally:
        stream.counts.close()  # type: ignore[attr-defined]
