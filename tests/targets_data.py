"""Datasets with targets, written on the spot: a COCO instances file over the repo's photos with known
boxes, images with a coloured square and the square's mask, and image-text shards written with the
``webdataset`` package's own ``TarWriter``. Also used by the bench (``stoker bench`` rows for targets)
to build larger sets from any folder of photos."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

__all__ = ["coco_dataset", "square_dataset", "caption_shards", "colour_of", "key_of_colour"]


def _boxes_for(width: int, height: int, count: int, rng: random.Random) -> list[list[float]]:
    """``count`` COCO ``[x, y, w, h]`` boxes inside a ``width x height`` image."""
    boxes = []
    for _ in range(count):
        w, h = rng.uniform(0.1, 0.6) * width, rng.uniform(0.1, 0.6) * height
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        boxes.append([round(x, 2), round(y, 2), round(w, 2), round(h, 2)])
    return boxes


def coco_dataset(folder: Path, photos: Sequence[Path], root: Path, boxes_per_image: int = 4, seed: int = 0) -> Path:
    """A COCO instances file for ``photos`` (paths under ``root``) with random known boxes; one
    ``iscrowd`` annotation per image (left out by default). Returns the file."""
    rng = random.Random(seed)
    images, annotations = [], []
    for number, photo in enumerate(photos):
        with Image.open(photo) as image:
            width, height = image.size
        image_id = 1000 + number
        images.append({"id": image_id, "file_name": str(photo.relative_to(root)), "width": width, "height": height})
        for box in _boxes_for(width, height, boxes_per_image, rng):
            annotations.append(
                {"id": len(annotations), "image_id": image_id, "bbox": box, "category_id": rng.randint(1, 90)}
            )
        annotations.append(
            {"id": len(annotations), "image_id": image_id, "bbox": [0, 0, 5, 5], "category_id": 1, "iscrowd": 1}
        )
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": []}))
    return path


def colour_of(key: int) -> tuple[int, int, int]:
    """A flat colour that names ``key`` (< 32) in an image, recoverable after JPEG and resizing."""
    return (8 * key + 4, 252 - 8 * key, 128)


def key_of_colour(red: float) -> int:
    """The key whose :func:`colour_of` has this red value."""
    return int(round((red - 4) / 8))


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95)
    return out.getvalue()


def square_dataset(folder: Path, count: int = 8, size: tuple[int, int] = (128, 96), seed: int = 0) -> Path:
    """PNG images of a coloured square on grey and their masks (the square is class 1 + i % 3); a JSON
    Lines manifest ``{"path", "mask", "caption"}``. Returns the manifest."""
    rng = random.Random(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "ann").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        width, height = size
        side = rng.randint(height // 2, 3 * height // 4)
        left, top = rng.randint(0, width - side), rng.randint(0, height - side)
        image = Image.new("RGB", size, (128, 128, 128))
        image.paste((255, 0, 0), (left, top, left + side, top + side))
        mask = Image.new("L", size, 0)
        mask.paste(1 + i % 3, (left, top, left + side, top + side))
        (folder / "img" / f"{i}.png").write_bytes(_png(image))
        (folder / "ann" / f"{i}.png").write_bytes(_png(mask))
        lines.append(json.dumps({"path": f"img/{i}.png", "mask": f"ann/{i}.png", "caption": f"square {i}"}))
    manifest = folder / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def caption_shards(folder: Path, shards: int = 2, per_shard: int = 6, size: tuple[int, int] = (48, 40)) -> str:
    """Image-text shards written with ``webdataset.TarWriter``: ``.jpg`` (a flat :func:`colour_of` the
    key), ``.txt`` (a caption naming the key) and ``.json`` (``{"key": n}``). Returns the pattern."""
    import webdataset

    folder.mkdir(parents=True, exist_ok=True)
    key = 0
    for shard in range(shards):
        with webdataset.TarWriter(str(folder / f"pairs-{shard:03d}.tar")) as sink:
            for _ in range(per_shard):
                image = Image.new("RGB", size, colour_of(key))
                sink.write(
                    {
                        "__key__": f"sample{key:05d}",
                        "jpg": _jpeg(image),
                        "txt": f"a photo numbered {key}",
                        "json": {"key": key, "tags": ["flat", "colour"]},
                    }
                )
                key += 1
    return str(folder / f"pairs-{{000..{shards - 1:03d}}}.tar")


def broken_datasets(folder: Path, squares: Path, photos: Sequence[Path], root: Path) -> dict[str, object]:
    """One dataset per source with a bad target on some samples; returns their paths and, per dataset,
    the bad samples' names with a word their reason must contain. ``squares``: a :func:`square_dataset`'s
    folder (96 x 72 images)."""
    import webdataset

    folder.mkdir(parents=True, exist_ok=True)
    Image.new("L", (50, 50), 0).save(folder / "small-mask.png")
    lines = [
        {"boxes": [[10, 10, 40, 40, 1]]},
        {"boxes": [[10, 10, 400, 40, 1]]},  # outside the 96 x 72 image
        {"boxes": [[40, 10, 10, 40, 1]]},  # negative width
        {"mask": str(folder / "small-mask.png")},  # not the image's size
        {"caption": None},  # missing
        {},
        {"mask": "ann/none.png"},  # no such file
        {},
    ]
    rows = []
    for i, line in enumerate(lines):
        row = {"path": f"img/{i}.png", "mask": f"ann/{i}.png", "caption": f"square {i}", "boxes": []}
        row.update(line)
        rows.append(json.dumps({k: v for k, v in row.items() if v is not None}))
    manifest = squares / "broken.jsonl"
    manifest.write_text("\n".join(rows) + "\n")
    with webdataset.TarWriter(str(folder / "broken-000.tar")) as sink:
        for key in range(6):
            sample: dict[str, object] = {"__key__": f"s{key}", "jpg": _jpeg(Image.new("RGB", (40, 32), colour_of(key)))}
            sample["txt"] = {1: None, 2: b"\xff\xfe broken"}.get(key, f"caption {key}")
            sample["json"] = b"{not json" if key == 3 else {"key": key}
            sink.write({name: value for name, value in sample.items() if value is not None})
    images = [{"id": n, "file_name": str(p.relative_to(root))} for n, p in enumerate(photos[:2])]
    images.append({"id": 99, "file_name": "no/such/photo.jpg"})
    coco = folder / "broken-coco.json"
    coco.write_text(
        json.dumps({"images": images, "annotations": [{"image_id": 0, "bbox": [1, 1, 5, 5], "category_id": 3}]})
    )
    return {
        "manifest": manifest,
        "shards": str(folder / "broken-000.tar"),
        "coco": coco,
        "bad": {
            "broken_rows": {
                "img/1.png": "outside",
                "img/2.png": "negative",
                "img/3.png": "mask is 50x50",
                "img/4.png": "missing",
                "img/6.png": "mask",
            },
            "broken_pairs": {"s1.jpg": "missing", "s2.jpg": "UTF-8", "s3.jpg": "JSON"},
            "broken_coco": {"no/such/photo.jpg": "cannot read"},
        },
    }
