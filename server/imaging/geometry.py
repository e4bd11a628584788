"""Per-sample geometry: which box of the source becomes the output, planned before decoding.

Planning first lets a worker decode a JPEG reduced in the DCT domain when the box is at least twice
the output size, and lets EXIF orientation be applied to the small output instead of the large
source. Parameters come from the sample's counter-based RNG, so they do not depend on which worker
or server runs the sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from stoker.client.protocol.rng import SampleRng
from stoker.server.imaging.pipelines import View

__all__ = [
    "Box",
    "SampleGeometry",
    "plan_geometry",
    "oriented_size",
    "raw_box",
    "reduction_for",
    "reduction_for_side",
]

Box = tuple[int, int, int, int]
"""``(left, top, right, bottom)`` in pixels, right and bottom exclusive."""

# EXIF orientations 5-8 swap width and height.
_TRANSPOSING = frozenset({5, 6, 7, 8})


@dataclass(frozen=True, slots=True)
class SampleGeometry:
    """What to do with one sample, in the coordinates of the upright (EXIF-oriented) image."""

    box: Box
    """Source box to resample."""
    resize: tuple[int, int]
    """``(height, width)`` the box is resized to."""
    crop: Box | None
    """Box cut from the resized image afterwards (the eval centre crop), or ``None``."""
    flip: bool
    """Mirror the output horizontally."""
    fill: int = 0
    """The value of pixels a ``crop`` reaching past the resized image adds (letterbox padding)."""


def oriented_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    """The upright ``(width, height)`` of a stored image with EXIF ``orientation``."""
    return (height, width) if orientation in _TRANSPOSING else (width, height)


def _random_resized_crop(width: int, height: int, view: View, rng: SampleRng) -> Box:
    # torchvision's RandomResizedCrop.get_params: 10 tries at a random area and log-uniform aspect,
    # then a centre crop clamped to the ratio range.
    area = width * height
    for _ in range(10):
        target_area = area * rng.uniform(*view.scale)
        aspect = rng.log_uniform(*view.ratio)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < view.ratio[0]:
        w, h = width, int(round(width / view.ratio[0]))
    elif in_ratio > view.ratio[1]:
        w, h = int(round(height * view.ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def plan_geometry(width: int, height: int, size: int, view: View, rng: SampleRng) -> SampleGeometry:
    """Plan one sample of an upright ``width x height`` image into a ``size x size`` output."""
    if view.geometry == "random_resized_crop":
        box = _random_resized_crop(width, height, view, rng)
        resize, crop = (size, size), None
    elif view.geometry == "resize_center_crop":
        # torchvision's Resize(short) keeps the aspect, truncating the long side; CenterCrop rounds.
        short = int(size * view.resize_ratio)
        resize = (int(short * height / width), short) if width <= height else (short, int(short * width / height))
        top = int(round((resize[0] - size) / 2.0))
        left = int(round((resize[1] - size) / 2.0))
        box, crop = (0, 0, width, height), (left, top, left + size, top + size)
    elif view.geometry == "letterbox":
        # The longer side becomes ``size``, aspect kept; the crop box reaches past the resized image
        # on the short side, centred, and the rest is padded with ``fill`` (YOLO's input transform).
        scale = size / max(width, height)
        resize = (max(1, min(size, int(round(height * scale)))), max(1, min(size, int(round(width * scale)))))
        pad_top, pad_left = (size - resize[0]) // 2, (size - resize[1]) // 2
        box, crop = (0, 0, width, height), (-pad_left, -pad_top, size - pad_left, size - pad_top)
        flip = view.hflip > 0.0 and rng.random() < view.hflip
        return SampleGeometry(box, resize, crop, flip, view.fill)
    else:
        box, resize, crop = (0, 0, width, height), (size, size), None
    flip = view.hflip > 0.0 and rng.random() < view.hflip
    return SampleGeometry(box, resize, crop, flip)


# Where upright point (x, y) lies in the stored image (w x h as stored), per EXIF orientation.
_TO_STORED: dict[int, Callable[[int, int, int, int], tuple[int, int]]] = {
    1: lambda x, y, w, h: (x, y),
    2: lambda x, y, w, h: (w - x, y),
    3: lambda x, y, w, h: (w - x, h - y),
    4: lambda x, y, w, h: (x, h - y),
    5: lambda x, y, w, h: (y, x),
    6: lambda x, y, w, h: (y, h - x),
    7: lambda x, y, w, h: (w - y, h - x),
    8: lambda x, y, w, h: (w - y, x),
}


def raw_box(box: Box, width: int, height: int, orientation: int) -> Box:
    """Map a box on the upright image to the stored image (``width x height`` as stored)."""
    left, top, right, bottom = box
    to_stored = _TO_STORED.get(orientation, _TO_STORED[1])
    x0, y0 = to_stored(left, top, width, height)
    x1, y1 = to_stored(right, bottom, width, height)
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def reduction_for(box: Box, resize: tuple[int, int], orientation: int) -> int:
    """The largest DCT scale-down (1, 2, 4 or 8) that keeps the box at least as large as the output."""
    out_h, out_w = resize
    if orientation in _TRANSPOSING:
        out_h, out_w = out_w, out_h
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    limit = min(box_w / out_w, box_h / out_h)
    for factor in (8, 4, 2):
        if limit >= factor:
            return factor
    return 1


def reduction_for_side(width: int, height: int, min_side: int) -> int:
    """The largest DCT scale-down (1, 2, 4 or 8) keeping the shorter side at least ``min_side``:
    decided by the image alone (``min_side`` 0: no reduction), as a cached dataset's images are."""
    if min_side <= 0:
        return 1
    for factor in (8, 4, 2):
        if min(width, height) / factor >= min_side:
            return factor
    return 1
