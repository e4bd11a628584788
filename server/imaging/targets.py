"""A sample's targets in a worker: raw values parsed and checked, and the geometric ones (boxes, a mask)
transformed exactly like the image of the sample's first view.

Boxes are in pixels of the upright (EXIF-oriented) image, ``xyxy`` once parsed. The view's geometry
maps them as it maps the image (crop box, scale to the resize, the centre or letterbox crop, the
flip), clips them to the output and drops those with less than ``min_box_visibility`` of their area
left (or none), with their classes. A mask is oriented, cropped, resized nearest-neighbour (never
interpolated between classes), padded with 0 and flipped. Geometric torchvision v2 post-ops then run on
image, boxes and mask together through ``tv_tensors``; plugins and photometric ops touch the image only.

Anything wrong with a target (invalid UTF-8 or JSON, a box outside the image or of negative size, a
mask whose size is not the image's, a missing member) raises :class:`BadTarget`: the sample is bad
under the server's ``on_error``, with the field and the reason.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stoker.server.data.locators import Locator
from stoker.server.imaging.decode import BadImage, ImageInfo
from stoker.server.imaging.geometry import SampleGeometry, oriented_size

__all__ = ["RawTarget", "BadTarget", "SampleTargets", "pad_crop", "parse_targets", "run_ops_with_targets"]

_BOX_SLACK = 1.0
"""Pixels a source box may reach past the image (rounding in annotation tools) before it is bad."""


@dataclass(frozen=True, slots=True)
class RawTarget:
    """One requested field of one sample, as the engine hands it to a worker: its raw bytes (``None``:
    missing) or, for a mask, where its PNG is."""

    name: str
    kind: str
    raw: bytes | None = None
    locator: Locator | None = None
    box_format: str = "xyxy"


class BadTarget(BadImage):
    """A target that cannot be used: the sample is bad (replaced or raised by policy)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"target {name!r}: {reason}")


@dataclass(slots=True)
class SampleTargets:
    """One sample's parsed targets: small values to send, and boxes/mask to transform with view 0."""

    values: dict[str, Any] = field(default_factory=dict)
    """``text`` and ``json`` (its JSON text) and ``label`` fields, ready for the wire."""
    boxes_name: str | None = None
    boxes: np.ndarray | None = None
    """``float32 N x 4`` ``xyxy``: in the upright source image, then in the output once placed."""
    box_labels: np.ndarray | None = None
    full_area: np.ndarray | None = None
    mask: np.ndarray | None = None
    """``uint8 H x W``: the source's (stored orientation), then the output's once placed."""
    min_visibility: float = 0.0

    @property
    def geometric(self) -> bool:
        """Whether anything here moves with the image."""
        return self.boxes is not None or self.mask is not None

    def place(self, plan: SampleGeometry, info: ImageInfo, side: int) -> None:
        """Apply the view's geometry (planned in upright coordinates) to the boxes and the mask."""
        left, top, right, bottom = plan.box
        resize_h, resize_w = plan.resize
        sx, sy = resize_w / max(1, right - left), resize_h / max(1, bottom - top)
        c_left, c_top = (plan.crop[0], plan.crop[1]) if plan.crop is not None else (0, 0)
        if self.boxes is not None:
            # One affine map per coordinate (x, y, x, y), then the mirror: as the image's pixels move.
            scale = np.array([sx, sy, sx, sy])
            offset = np.array([-left * sx - c_left, -top * sy - c_top, -left * sx - c_left, -top * sy - c_top])
            boxes = self.boxes.astype(np.float64) * scale + offset
            if plan.flip:
                boxes = np.stack([side - boxes[:, 2], boxes[:, 1], side - boxes[:, 0], boxes[:, 3]], axis=1)
            self.full_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            self.boxes = boxes.astype(np.float32)
            self.clip(side, side, use_visibility=True)
        if self.mask is not None:
            self.mask = _place_mask(self.mask, plan, info, side)

    def clip(self, height: int, width: int, use_visibility: bool = False) -> None:
        """Clip boxes to the ``width x height`` output and drop, with their classes, those left with
        no area (or less than ``min_visibility`` of it)."""
        if self.boxes is None or self.box_labels is None:
            return
        boxes = np.minimum(np.maximum(self.boxes.astype(np.float64), 0.0), np.array([width, height, width, height]))
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        keep = area > 0
        if use_visibility and self.min_visibility > 0 and self.full_area is not None:
            keep &= area >= self.min_visibility * self.full_area
        self.boxes, self.box_labels = boxes[keep].astype(np.float32), self.box_labels[keep]
        if self.full_area is not None and len(self.full_area) == len(keep):
            self.full_area = self.full_area[keep]

    def wire_values(self) -> dict[str, Any]:
        """What the sample's result carries back to the engine (the mask goes in the slot)."""
        out = dict(self.values)
        if self.boxes_name is not None and self.boxes is not None and self.box_labels is not None:
            out[self.boxes_name] = (
                np.ascontiguousarray(self.boxes, dtype="<f4").tobytes(),
                np.ascontiguousarray(self.box_labels, dtype="<i8").tobytes(),
            )
        return out


def parse_targets(
    targets: tuple[RawTarget, ...], info: ImageInfo, mask_bytes: bytes | None, min_visibility: float
) -> SampleTargets:
    """Parse and check every raw target of a sample whose image header is ``info``."""
    out = SampleTargets(min_visibility=min_visibility)
    for target in targets:
        if target.kind == "mask":
            if mask_bytes is None:
                raise BadTarget(target.name, "missing (no mask member or field)")
            out.mask = _decode_mask(target.name, mask_bytes, info)
            continue
        if target.raw is None:
            raise BadTarget(target.name, "missing (no member or field for this sample)")
        if target.kind == "text":
            try:
                out.values[target.name] = target.raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadTarget(target.name, f"not valid UTF-8: {exc}") from None
        elif target.kind == "json":
            out.values[target.name] = _json(target).decode("utf-8")
        elif target.kind == "label":
            value = _json_value(target)
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                value = int(value.strip())
            if not isinstance(value, int) or isinstance(value, bool) or not -(2**63) <= value < 2**63:
                raise BadTarget(target.name, f"{value!r} is not an integer")
            out.values[target.name] = value
        elif target.kind == "boxes":
            width, height = oriented_size(info.width, info.height, info.orientation)
            out.boxes_name = target.name
            out.boxes, out.box_labels = _boxes(target, width, height)
    return out


def _json(target: RawTarget) -> bytes:
    raw = target.raw or b""
    try:
        json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadTarget(target.name, f"not valid JSON: {exc}") from None
    return raw


def _json_value(target: RawTarget) -> Any:
    try:
        return json.loads(target.raw or b"")
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadTarget(target.name, f"not valid JSON: {exc}") from None


def _boxes(target: RawTarget, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """``{"boxes": [[4 numbers]...], "labels": [ints]}`` or ``[[4 numbers, class]...]`` in the
    declared format, as ``xyxy`` ``float32`` boxes and ``int64`` classes, checked against the image."""
    value = _json_value(target)
    if isinstance(value, dict):
        boxes, labels = value.get("boxes"), value.get("labels")
    elif isinstance(value, list):
        rows = [row for row in value if isinstance(row, list)]
        boxes = [row[:4] for row in rows] if len(rows) == len(value) else None
        labels = [row[4] if len(row) == 5 else None for row in rows] if boxes is not None else None
    else:
        boxes = labels = None
    if not isinstance(boxes, list) or not isinstance(labels, list) or len(boxes) != len(labels):
        shape = '{"boxes": [[4 numbers], ...], "labels": [ints]} or [[4 numbers, class], ...]'
        raise BadTarget(target.name, f"must be {shape}")
    if not _well_formed(boxes, labels, target.raw or b""):
        _name_malformed(target.name, boxes, labels)
    array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    fmt = target.box_format
    if fmt in ("xywh", "cxcywh"):
        if (array[:, 2:] < 0).any():
            bad = int(np.flatnonzero((array[:, 2:] < 0).any(axis=1))[0])
            raise BadTarget(target.name, f"box {bad} {boxes[bad]} has a negative size")
        x, y, w, h = array.T
        if fmt == "cxcywh":
            x, y = x - w / 2, y - h / 2
        array = np.stack([x, y, x + w, y + h], axis=1)
    sizes = array[:, 2:] - array[:, :2]
    if (sizes < 0).any():
        bad = int(np.flatnonzero((sizes < 0).any(axis=1))[0])
        raise BadTarget(target.name, f"box {bad} {boxes[bad]} has a negative size")
    outside = (array[:, :2] < -_BOX_SLACK).any(axis=1) | (array[:, 2] > width + _BOX_SLACK)
    outside |= array[:, 3] > height + _BOX_SLACK
    if outside.any():
        bad = int(np.flatnonzero(outside)[0])
        raise BadTarget(target.name, f"box {bad} {boxes[bad]} lies outside the {width}x{height} image")
    return array.astype(np.float32), np.asarray(labels, dtype=np.int64)


def _well_formed(boxes: list[Any], labels: list[Any], raw: bytes) -> bool:
    """Whether every box is 4 finite numbers and every class an integer, checked in numpy (JSON's
    ``true``/``false`` anywhere: the slow check, as numpy would take them for numbers)."""
    if not boxes:
        return True
    if b"true" in raw or b"false" in raw:
        return False
    try:
        array = np.asarray(boxes)  # not dtype=float: numpy would read "1" as a number
        classes = np.asarray(labels)
    except (TypeError, ValueError):
        return False
    if array.shape != (len(boxes), 4) or array.dtype.kind not in "iuf" or classes.dtype.kind not in "iu":
        return False
    return bool(np.isfinite(array).all())


def _name_malformed(name: str, boxes: list[Any], labels: list[Any]) -> None:
    """Raise :class:`BadTarget` naming the first malformed box or class."""
    for number, (box, label) in enumerate(zip(boxes, labels, strict=True)):
        if (
            not isinstance(box, list)
            or len(box) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in box)
        ):
            raise BadTarget(name, f"box {number} {box!r} is not 4 finite numbers")
        if not isinstance(label, int) or isinstance(label, bool):
            raise BadTarget(name, f"box {number} has class {label!r}, not an integer")
    raise BadTarget(name, "boxes or classes are not numbers")  # unreachable in practice: numpy refused them


def _decode_mask(name: str, data: bytes, info: ImageInfo) -> np.ndarray:
    """A single-channel 8-bit PNG the size of the stored image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode not in ("L", "P", "1"):
                raise BadTarget(name, f"mask is {image.mode}; a mask is a single-channel 8-bit PNG")
            image.load()
            mask = np.asarray(image, dtype=np.uint8)
    except BadTarget:
        raise
    except Exception as exc:  # Pillow raises many types for a corrupt file: all mean a bad mask
        raise BadTarget(name, f"mask cannot be decoded: {type(exc).__name__}: {exc}") from None
    if mask.shape != (info.height, info.width):
        raise BadTarget(name, f"mask is {mask.shape[1]}x{mask.shape[0]}, its image {info.width}x{info.height}")
    return mask


_ORIENT = {
    2: lambda m: m[:, ::-1],
    3: lambda m: m[::-1, ::-1],
    4: lambda m: m[::-1],
    5: lambda m: m.T,
    6: lambda m: m.T[:, ::-1],
    7: lambda m: m[::-1, ::-1].T,
    8: lambda m: m.T[::-1],
}


def _nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize (pixel centres, as torchvision's NEAREST_EXACT): classes stay classes."""
    rows = np.minimum(((np.arange(height) + 0.5) * mask.shape[0] / height).astype(np.int64), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * mask.shape[1] / width).astype(np.int64), mask.shape[1] - 1)
    return mask[rows[:, None], cols[None, :]]


def _place_mask(mask: np.ndarray, plan: SampleGeometry, info: ImageInfo, side: int) -> np.ndarray:
    upright = _ORIENT.get(info.orientation, lambda m: m)(mask)
    left, top, right, bottom = plan.box
    resized = _nearest(upright[top:bottom, left:right], *plan.resize)
    if plan.crop is not None:
        resized = pad_crop(resized, plan.crop)
    if plan.flip:
        resized = resized[:, ::-1]
    out = np.ascontiguousarray(resized)
    if out.shape != (side, side):
        raise ValueError(f"mask placed as {out.shape}, the view is {side}x{side}")  # unreachable: a bug
    return out


def pad_crop(array: np.ndarray, crop: tuple[int, int, int, int], fill: int = 0) -> np.ndarray:
    """``array[top:bottom, left:right]`` where the box may reach outside: padded with ``fill``."""
    left, top, right, bottom = crop
    out = np.full((bottom - top, right - left, *array.shape[2:]), fill, dtype=array.dtype)
    src_top, src_left = max(0, top), max(0, left)
    src_bottom, src_right = min(array.shape[0], bottom), min(array.shape[1], right)
    if src_bottom > src_top and src_right > src_left:
        out[src_top - top : src_bottom - top, src_left - left : src_right - left] = array[
            src_top:src_bottom, src_left:src_right
        ]
    return out


# -- post-ops with targets ------------------------------------------------------------------------------

_BUILT: dict[tuple[str, int], tuple[tuple[str, Any, bool], ...]] = {}


def _ops(pipeline_name: str, view_index: int, specs: tuple[Any, ...]) -> tuple[tuple[str, Any, bool], ...]:
    """``(label, callable, takes_targets)`` per post-op: torchvision's own transforms (they move
    ``tv_tensors``), plugins with the image alone. Built once per worker."""
    from stoker.server.imaging.postops import build_op

    key = (pipeline_name, view_index)
    built = _BUILT.get(key)
    if built is None:
        built = _BUILT[key] = tuple((spec.label, build_op(spec), spec.op != "plugin") for spec in specs)
    return built


def run_ops_with_targets(
    pipeline_name: str,
    view_index: int,
    specs: tuple[Any, ...],
    chw: Any,
    targets: SampleTargets,
    key: int,
    size: int,
    times: dict[str, float],
) -> Any:
    """Run a view's post-ops on ``chw`` (``3 x H x W`` ``uint8``) with the boxes and mask of
    ``targets`` (updated in place); returns the image. Raises ``PostOpError`` as the image-only path."""
    import torch
    from torchvision import tv_tensors

    from stoker.server.imaging.errors import PostOpError
    from stoker.server.imaging.postops import check_output, seed_generators

    seed_generators(key)
    image: Any = tv_tensors.Image(chw)
    boxes = mask = None
    if targets.boxes is not None:
        boxes = tv_tensors.BoundingBoxes(
            torch.from_numpy(targets.boxes), format="XYXY", canvas_size=(chw.shape[1], chw.shape[2])
        )
    if targets.mask is not None:
        mask = tv_tensors.Mask(torch.from_numpy(targets.mask.copy())[None])
    ops = _ops(pipeline_name, view_index, specs)
    for label, op, takes_targets in ops:
        started = time.perf_counter()
        try:
            if takes_targets:
                inputs = [x for x in (image, boxes, mask) if x is not None]
                outputs = op(*inputs) if len(inputs) > 1 else (op(image),)
                image = outputs[0]
                rest = list(outputs[1:])
                if boxes is not None:
                    boxes = rest.pop(0)
                if mask is not None:
                    mask = rest.pop(0)
            else:
                image = op(image.as_subclass(torch.Tensor))
        except Exception as exc:  # the op's failure is the pipeline's, as on the image-only path
            import traceback

            raise PostOpError(label, f"{type(exc).__name__}: {exc}", traceback.format_exc()[-8000:]) from exc
        times[label] = times.get(label, 0.0) + time.perf_counter() - started
        if not isinstance(image, torch.Tensor):
            raise PostOpError(label, f"returned {type(image).__name__}; post-ops take and return a 3 x H x W tensor")
    result = image.as_subclass(torch.Tensor)
    check_output(result, size, ops[-1][0])
    if boxes is not None:
        targets.boxes = boxes.as_subclass(torch.Tensor).numpy().astype(np.float32).reshape(-1, 4)
        targets.clip(size, size)
    if mask is not None:
        targets.mask = np.ascontiguousarray(mask.as_subclass(torch.Tensor).numpy()[0], dtype=np.uint8)
    return result
