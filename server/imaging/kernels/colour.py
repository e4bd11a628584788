"""Photometric kernels on ``H x W x 3`` ``uint8`` arrays, one OpenCV call or table lookup each.

Each mirrors the torchvision v2 kernel of the same name for the same factor: where torchvision's
result is a per-value function of the input (brightness, solarize, posterize, invert, autocontrast,
equalize, contrast once the mean is known) the kernel is a 256-entry table computed with torchvision's
own arithmetic (float32, truncation to ``uint8``), so the bytes match; saturation, grayscale and
sharpness blend with a grey or blurred image OpenCV rounds where torchvision truncates (at most 2
levels apart); hue works in OpenCV's float HSV (within 1 level).
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = [
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "adjust_sharpness",
    "rgb_to_grayscale",
    "solarize",
    "posterize",
    "invert",
    "autocontrast",
    "equalize",
]

_LEVELS = np.arange(256, dtype=np.float32)
# torchvision's grey weights (ITU-R 601-2 as PIL rounds them), as a colour-transform matrix whose
# offset column makes OpenCV's rounding a truncation, as torchvision casts.
_GREY = np.array([0.2989, 0.587, 0.114], dtype=np.float32)
_TRUNCATE = -0.5 + 1e-3
_GREY3 = np.repeat(np.append(_GREY, np.float32(_TRUNCATE))[None, :], 3, axis=0)


def _table(values: np.ndarray) -> np.ndarray:
    """A ``uint8`` table from float levels as torchvision casts them: clamp to [0, 255], truncate."""
    return np.clip(values, 0.0, 255.0).astype(np.uint8)


def _lut(image: np.ndarray, table: np.ndarray) -> np.ndarray:
    return cv2.LUT(image, table)


def adjust_brightness(image: np.ndarray, brightness_factor: float) -> np.ndarray:
    """``image * factor``, clamped and truncated."""
    return _lut(image, _table(_LEVELS * np.float32(brightness_factor)))


def adjust_contrast(image: np.ndarray, contrast_factor: float) -> np.ndarray:
    """A blend with the mean of the (floored) grey image."""
    mean = np.float32(cv2.mean(cv2.transform(image, _GREY3[:1]))[0])
    return _lut(image, _table(_LEVELS * np.float32(contrast_factor) + mean * np.float32(1.0 - contrast_factor)))


def _blend(image: np.ndarray, other: np.ndarray, factor: float) -> np.ndarray:
    # torchvision truncates the blend to uint8; addWeighted rounds: an offset of -0.5 truncates for
    # every non-integral value and moves exact integers by at most one level.
    return cv2.addWeighted(image, factor, other, 1.0 - factor, _TRUNCATE)


def _grey(image: np.ndarray) -> np.ndarray:
    """The grey image (floored, as torchvision's) as 3 equal channels."""
    return cv2.transform(image, _GREY3)


def adjust_saturation(image: np.ndarray, saturation_factor: float) -> np.ndarray:
    """A blend with the grey image."""
    return _blend(image, _grey(image), saturation_factor)


def rgb_to_grayscale(image: np.ndarray, num_output_channels: int = 1) -> np.ndarray | None:
    """The grey image; only the 3-channel output is a fast kernel (the view stays ``3 x H x W``)."""
    if num_output_channels != 3:
        return None
    return _grey(image)


def adjust_hue(image: np.ndarray, hue_factor: float) -> np.ndarray:
    """Hue rotated by ``hue_factor`` of a turn, in float HSV (OpenCV's hue is in degrees)."""
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor ({hue_factor}) is not in [-0.5, 0.5].")
    hsv = cv2.cvtColor(image.astype(np.float32) * np.float32(1.0 / 255.0), cv2.COLOR_RGB2HSV)
    hue = hsv[:, :, 0]
    hue += np.float32(hue_factor * 360.0)
    np.remainder(hue, np.float32(360.0), out=hue)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    # torchvision's float-to-uint8 conversion: times 256 - 1e-3, truncated.
    return cv2.convertScaleAbs(rgb, alpha=255.999, beta=_TRUNCATE)


def adjust_sharpness(image: np.ndarray, sharpness_factor: float) -> np.ndarray:
    """A blend with the 3 x 3 smoothed image (13ths, 5 at the centre); the border stays."""
    if sharpness_factor < 0:
        raise ValueError(f"sharpness_factor ({sharpness_factor}) is not non-negative.")
    height, width = image.shape[:2]
    if height <= 2 or width <= 2:
        return image
    kernel = np.full((3, 3), 1.0 / 13.0, dtype=np.float32)
    kernel[1, 1] = 5.0 / 13.0
    smooth = cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REPLICATE)
    out = _blend(image, smooth, sharpness_factor)
    out[0, :], out[-1, :], out[:, 0], out[:, -1] = image[0, :], image[-1, :], image[:, 0], image[:, -1]
    return out


def solarize(image: np.ndarray, threshold: float) -> np.ndarray:
    """Levels at or above ``threshold`` inverted."""
    table = np.where(threshold <= _LEVELS, 255.0 - _LEVELS, _LEVELS).astype(np.uint8)
    return _lut(image, table)


def posterize(image: np.ndarray, bits: int) -> np.ndarray:
    """The ``bits`` high bits of every level kept."""
    mask = (0xFF << (8 - bits)) & 0xFF if bits < 8 else 0xFF
    return np.bitwise_and(image, np.uint8(mask))


def invert(image: np.ndarray) -> np.ndarray:
    """``255 - image``."""
    return cv2.bitwise_not(image)


def autocontrast(image: np.ndarray) -> np.ndarray:
    """Each channel stretched to [0, 255]: one table per channel."""
    tables = np.empty((256, 1, 3), dtype=np.uint8)
    for channel in range(3):
        low, high = cv2.minMaxLoc(image[:, :, channel])[:2]
        low, high = np.float32(low), np.float32(high)
        if low == high:
            tables[:, 0, channel] = np.arange(256, dtype=np.uint8)
            continue
        inv_scale = (high - low) * np.float32(1.0 / 255.0)
        tables[:, 0, channel] = _table((_LEVELS - low) / inv_scale)
    return cv2.LUT(image, tables)


def equalize(image: np.ndarray) -> np.ndarray:
    """PIL's histogram equalisation per channel, as torchvision computes its table."""
    tables = np.empty((256, 1, 3), dtype=np.uint8)
    pixels = image.shape[0] * image.shape[1]
    for channel in range(3):
        hist = cv2.calcHist([image], [channel], None, [256], [0, 256]).reshape(-1).astype(np.int64)
        cum = np.cumsum(hist)
        last = int(np.argmax(cum))
        step = (pixels - int(hist[last])) // 255
        if step == 0:
            tables[:, 0, channel] = np.arange(256, dtype=np.uint8)
            continue
        table = np.zeros(256, dtype=np.int64)
        table[1:] = (cum[:-1] + step // 2) // step
        tables[:, 0, channel] = np.clip(table, 0, 255).astype(np.uint8)
    return cv2.LUT(image, tables)
