"""Gaussian blur on ``H x W x 3`` ``uint8``: torchvision's separable kernel, OpenCV's filter.

The 1-D kernel is torchvision's (``softmax(-(x / sigma)^2)`` over ``(k - 1) / (2 sqrt 2)``-wide
``linspace``), the border is its ``reflect`` padding (OpenCV's ``BORDER_REFLECT_101``); OpenCV rounds
its float result as torchvision does, so outputs differ only by float summation order (1 level).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

__all__ = ["gaussian_blur"]


def _kernel1d(size: int, sigma: float) -> np.ndarray:
    lim = (size - 1) / (2.0 * math.sqrt(2.0))
    x = np.linspace(-lim, lim, size, dtype=np.float32)
    logits = -((x / np.float32(sigma)) ** 2)
    weights = np.exp(logits - logits.max())
    return (weights / weights.sum()).astype(np.float32)


def gaussian_blur(
    image: np.ndarray, kernel_size: int | Sequence[int], sigma: float | Sequence[float] | None = None
) -> np.ndarray | None:
    """The blurred image; ``None`` where torchvision's padding would refuse (kernel wider than the image)."""
    kx, ky = (kernel_size, kernel_size) if isinstance(kernel_size, int) else (int(kernel_size[0]), int(kernel_size[1]))
    if kx % 2 == 0 or ky % 2 == 0 or kx <= 0 or ky <= 0:
        return None  # torchvision raises its own error
    if sigma is None:
        sx, sy = kx * 0.15 + 0.35, ky * 0.15 + 0.35
    elif isinstance(sigma, (int, float)):
        sx = sy = float(sigma)
    else:
        sx, sy = (float(sigma[0]), float(sigma[-1]))
    height, width = image.shape[:2]
    if kx // 2 >= width or ky // 2 >= height or sx <= 0 or sy <= 0:
        return None
    return cv2.sepFilter2D(image, -1, _kernel1d(kx, sx), _kernel1d(ky, sy), borderType=cv2.BORDER_REFLECT_101)
