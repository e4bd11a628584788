"""Bytes to a 3-channel ``uint8`` array, or a :class:`BadImage` saying why not.

JPEGs go through libjpeg-turbo (``simplejpeg``): it decodes straight to a numpy array, can scale down
in the DCT domain (1/2, 1/4, 1/8) and reports corrupt data instead of returning grey blocks. Anything
else (PNG, WebP, CMYK JPEG, ...) goes through Pillow. Sizes are checked from the header before any
pixel is decoded, so a small file that declares a huge image is refused without allocating it.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image

from stoker.server.imaging.limits import DecodeLimits

__all__ = ["BadImage", "ImageInfo", "DecodeLimits", "probe", "decode", "ALPHA_BACKGROUND"]

# Transparent pixels are composited onto ImageNet's mean colour, which normalises to about zero.
ALPHA_BACKGROUND = (124, 116, 104)
_EXIF_ORIENTATION = 0x0112
_JPEG_SOI = b"\xff\xd8\xff"


class BadImage(Exception):
    """A sample that cannot be decoded; ``reason`` is shown in ``/status``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the header says: stored size, EXIF orientation and which decoder will run."""

    width: int
    height: int
    orientation: int
    jpeg: bool


def _jpeg_orientation(data: bytes) -> int:
    """EXIF orientation from a JPEG's APP1 segment (1 when absent or malformed)."""
    pos, end = 2, len(data)
    while pos + 4 <= end and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            pos += 1 if marker == 0xFF else 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no more metadata
            break
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\x00\x00":
            return _tiff_orientation(data[pos + 10 : pos + 2 + length])
        pos += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    count = int.from_bytes(tiff[ifd : ifd + 2], order)
    for i in range(min(count, 512)):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            break
        if int.from_bytes(tiff[entry : entry + 2], order) == _EXIF_ORIENTATION:
            value = int.from_bytes(tiff[entry + 8 : entry + 10], order)
            return value if 1 <= value <= 8 else 1
    return 1


def probe(data: bytes, limits: DecodeLimits) -> ImageInfo:
    """Read the header: size, orientation, decoder. Raises :class:`BadImage`."""
    if data.startswith(_JPEG_SOI):
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            colorspace = None  # let Pillow judge odd but valid JPEGs (and name the error)
        if colorspace in ("RGB", "Gray", "YCbCr"):
            info = ImageInfo(width, height, _jpeg_orientation(data), jpeg=True)
            _check_declared(info, limits)
            return info
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            orientation = _header_orientation(image)
    except Image.DecompressionBombError as exc:
        raise BadImage(f"decompression bomb: {exc}") from None
    except Exception as exc:  # Pillow signals unreadable data with many exception types
        raise BadImage(f"not a decodable image: {type(exc).__name__}: {exc}") from None
    info = ImageInfo(image.width, image.height, orientation if 1 <= orientation <= 8 else 1, jpeg=False)
    _check_declared(info, limits)
    return info


def _header_orientation(image: Image.Image) -> int:
    """EXIF orientation known from the headers alone. ``getexif()`` would decode a whole PNG to look
    for an eXIf chunk after the pixels; such late chunks are ignored (documented)."""
    if image.format == "TIFF":
        value = image.tag_v2.get(_EXIF_ORIENTATION, 1)  # type: ignore[attr-defined]
    elif "exif" in image.info:
        exif = Image.Exif()
        exif.load(image.info["exif"])
        value = exif.get(_EXIF_ORIENTATION, 1)
    else:
        value = 1
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1


def _check_declared(info: ImageInfo, limits: DecodeLimits) -> None:
    pixels = info.width * info.height
    if info.width <= 0 or info.height <= 0:
        raise BadImage(f"header declares an empty image {info.width}x{info.height}")
    if pixels > limits.max_image_pixels:
        raise BadImage(f"decompression bomb: header declares {info.width}x{info.height} pixels")


def decode(data: bytes, info: ImageInfo, reduction: int, limits: DecodeLimits) -> np.ndarray:
    """Decode to an ``H x W x 3`` ``uint8`` array in stored orientation, scaled down by up to ``reduction``.

    The result may be larger than ``1/reduction`` of the stored size (Pillow rounds, PNG cannot
    scale); callers map their box with the actual shape.
    """
    if info.jpeg:
        width, height = math.ceil(info.width / reduction), math.ceil(info.height / reduction)
        _check_decoded(width, height, info, limits)
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=width, min_height=height, strict=True)
        except ValueError as exc:
            raise BadImage(f"corrupt JPEG: {exc}") from None
    return _decode_with_pillow(data, info, reduction, limits)


def _check_decoded(width: int, height: int, info: ImageInfo, limits: DecodeLimits) -> None:
    if width * height > limits.max_decoded_pixels:
        raise BadImage(
            f"image {info.width}x{info.height} would decode to {width}x{height} pixels, "
            f"over max_decoded_pixels={limits.max_decoded_pixels}"
        )


def _decode_with_pillow(data: bytes, info: ImageInfo, reduction: int, limits: DecodeLimits) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if reduction > 1 and image.format == "JPEG":
                image.draft(image.mode, (info.width // reduction, info.height // reduction))
            _check_decoded(image.width, image.height, info, limits)
            image.load()
            return _to_rgb(image)
    except BadImage:
        raise
    except Exception as exc:  # truncated, corrupt or unsupported: all are bad samples
        raise BadImage(f"cannot decode: {type(exc).__name__}: {exc}") from None


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit (or wider) greyscale: keep the top 8 bits rather than clipping at 255.
        values = np.asarray(image)
        if mode != "F" and values.max(initial=0) > 255:
            values = values.astype(np.uint32) >> 8
        grey = np.clip(values, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint16)
        alpha = rgba[:, :, 3:4]
        background = np.asarray(ALPHA_BACKGROUND, dtype=np.uint16)
        blended = (rgba[:, :, :3] * alpha + background * (255 - alpha) + 127) // 255
        return blended.astype(np.uint8)
    if mode != "RGB":
        image = image.convert("RGB")
    return np.array(image)  # writable (np.asarray of a Pillow image is read-only)
