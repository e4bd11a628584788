"""Rotation, affine and perspective warps on ``H x W x 3`` ``uint8`` through OpenCV's warps.

torchvision maps each output pixel through the inverse matrix (``_get_inverse_affine_matrix``, centred
on the image) and samples with ``grid_sample``; the same inverse map, moved to pixel indices, goes to
``cv2.warpAffine`` / ``cv2.warpPerspective`` with ``WARP_INVERSE_MAP``, the same interpolation
(nearest or bilinear) and the fill as a constant border. OpenCV's coordinates are fixed point (1/32
pixel), so a pixel on an edge can land on its neighbour: the bound is 1 level on 95 % of pixels.
Anything else torchvision accepts (``expand``, bicubic, a fill per channel of another length) returns
``None`` and runs torchvision's kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2.functional._geometry import (
    _affine_parse_args,
    _check_interpolation,
    _get_inverse_affine_matrix,
)

__all__ = ["affine", "rotate", "perspective"]

_FLAGS = {InterpolationMode.NEAREST: cv2.INTER_NEAREST, InterpolationMode.BILINEAR: cv2.INTER_LINEAR}


def _flags(interpolation: Any) -> int | None:
    mode = _check_interpolation(interpolation)
    flag = _FLAGS.get(mode)
    return None if flag is None else flag | cv2.WARP_INVERSE_MAP


def _border(fill: Any) -> tuple[float, float, float] | None:
    """OpenCV's border value for torchvision's fill (``None`` is 0)."""
    if fill is None:
        return (0.0, 0.0, 0.0)
    if isinstance(fill, (int, float)):
        return (float(fill),) * 3
    values = [float(v) for v in fill]
    if len(values) == 1:
        return (values[0],) * 3
    return (values[0], values[1], values[2]) if len(values) == 3 else None


def _warp(image: np.ndarray, inverse: Sequence[float], flags: int | None, fill: Any) -> np.ndarray | None:
    """``image`` resampled through torchvision's centred inverse matrix, on pixel indices."""
    border = _border(fill)
    if flags is None or border is None:
        return None
    height, width = image.shape[:2]
    a, b, c, d, e, f = inverse
    cx, cy = (width - 1) * 0.5, (height - 1) * 0.5
    # source = A (dest - centre) + t + centre
    matrix = np.array([[a, b, c + cx - a * cx - b * cy], [d, e, f + cy - d * cx - e * cy]], dtype=np.float64)
    return cv2.warpAffine(
        image, matrix, (width, height), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=border
    )


def _centre(center: Sequence[float] | None, width: int, height: int) -> list[float]:
    if center is None:
        return [0.0, 0.0]
    return [float(center[0]) - width * 0.5, float(center[1]) - height * 0.5]


def affine(
    image: np.ndarray,
    angle: float,
    translate: Sequence[float],
    scale: float,
    shear: Sequence[float],
    interpolation: Any = InterpolationMode.NEAREST,
    fill: Any = None,
    center: Sequence[float] | None = None,
) -> np.ndarray | None:
    """torchvision's ``affine`` (same arguments)."""
    interpolation = _check_interpolation(interpolation)
    angle, translate, shear, center = _affine_parse_args(angle, translate, scale, shear, interpolation, center)
    height, width = image.shape[:2]
    inverse = _get_inverse_affine_matrix(
        _centre(center, width, height), angle, [float(t) for t in translate], scale, shear
    )
    return _warp(image, inverse, _flags(interpolation), fill)


def rotate(
    image: np.ndarray,
    angle: float,
    interpolation: Any = InterpolationMode.NEAREST,
    expand: bool = False,
    center: Sequence[float] | None = None,
    fill: Any = None,
) -> np.ndarray | None:
    """torchvision's ``rotate`` (``expand`` runs torchvision's)."""
    if expand:
        return None
    angle = angle % 360
    height, width = image.shape[:2]
    if center is None and (angle in (0, 180) or (angle in (90, 270) and height == width)):
        return None  # torchvision's exact fast paths: transposes
    inverse = _get_inverse_affine_matrix(_centre(center, width, height), -angle, [0.0, 0.0], 1.0, [0.0, 0.0])
    return _warp(image, inverse, _flags(interpolation), fill)


def perspective(
    image: np.ndarray,
    startpoints: Any,
    endpoints: Any,
    interpolation: Any = InterpolationMode.BILINEAR,
    fill: Any = None,
    coefficients: Sequence[float] | None = None,
) -> np.ndarray | None:
    """torchvision's ``perspective`` given its coefficients (as ``RandomPerspective`` passes them)."""
    flags, border = _flags(interpolation), _border(fill)
    if coefficients is None or startpoints is not None or flags is None or border is None:
        return None
    a, b, c, d, e, f, g, h = (float(x) for x in coefficients)
    homography = np.array([[a, b, c], [d, e, f], [g, h, 1.0]], dtype=np.float64)
    # torchvision evaluates at pixel centres (index + 0.5) and samples at the result - 0.5.
    shift = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    unshift = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
    matrix = unshift @ homography @ shift
    height, width = image.shape[:2]
    return cv2.warpPerspective(
        image, matrix, (width, height), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=border
    )
