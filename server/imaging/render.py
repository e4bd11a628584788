"""Run one sample end to end: read, decode (reduced when possible), crop, resize once, orient, flip,
and write the result straight into its row of the shared batch buffer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from stoker.client.protocol.rng import SampleRng
from stoker.server.imaging.decode import DecodeLimits, decode, probe, read_file
from stoker.server.imaging.geometry import oriented_size, plan_geometry, raw_box, reduction_for
from stoker.server.imaging.pipelines import Pipeline

__all__ = ["StageTimes", "render_sample", "render_bytes", "orient", "warm_up"]


@dataclass(slots=True)
class StageTimes:
    """Seconds spent per stage, summed over the samples of a task."""

    read: float = 0.0
    decode: float = 0.0
    augment: float = 0.0

    def as_tuple(self) -> tuple[float, float, float]:
        """``(read, decode, augment)``."""
        return self.read, self.decode, self.augment


def orient(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """Stored ``pixels`` (H x W x C) turned upright per EXIF ``orientation``.

    Flips go through torch: its flip kernel is an order of magnitude faster than numpy copying from
    a negative-stride view of 3-byte pixels.
    """
    if orientation == 2:
        return pixels.flip(1)
    if orientation == 3:
        return pixels.flip(0, 1)
    if orientation == 4:
        return pixels.flip(0)
    if orientation == 5:
        return pixels.transpose(0, 1)
    if orientation == 6:
        return pixels.transpose(0, 1).flip(1)
    if orientation == 7:
        return pixels.flip(0, 1).transpose(0, 1)
    if orientation == 8:
        return pixels.transpose(0, 1).flip(0)
    return pixels


def _resize(pixels: np.ndarray, height: int, width: int) -> torch.Tensor:
    """``pixels`` (H x W x 3) resized to ``height x width``, as an H x W x 3 tensor."""
    tensor = torch.from_numpy(np.ascontiguousarray(pixels))
    if pixels.shape[0] == height and pixels.shape[1] == width:
        return tensor
    # Viewed as NCHW with a batch stride of H*W*3 (not 0 or 3) the tensor is unambiguously
    # channels_last, so interpolate keeps that layout and takes torch's vectorised uint8
    # antialiased path, as torchvision's tensor Resize does; the output is H x W x 3 already.
    h, w = pixels.shape[:2]
    batch = tensor.as_strided((1, 3, h, w), (h * w * 3, 1, w * 3, 3))
    out = F.interpolate(batch, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return out.permute(0, 2, 3, 1)[0]


def render_sample(
    path: bytes, key: int, pipeline: Pipeline, size: int, out: np.ndarray, limits: DecodeLimits, times: StageTimes
) -> None:
    """Produce one sample into ``out`` (``size x size x 3`` ``uint8``); raises ``BadImage``."""
    started = time.perf_counter()
    data = read_file(path, limits)
    times.read += time.perf_counter() - started
    render_bytes(data, key, pipeline, size, out, limits, times)


def render_bytes(
    data: bytes, key: int, pipeline: Pipeline, size: int, out: np.ndarray, limits: DecodeLimits, times: StageTimes
) -> None:
    """Like :func:`render_sample`, from the file's bytes."""
    read_done = time.perf_counter()
    info = probe(data, limits)
    width, height = oriented_size(info.width, info.height, info.orientation)
    geometry = plan_geometry(width, height, size, pipeline, SampleRng(key))
    box = raw_box(geometry.box, info.width, info.height, info.orientation)
    pixels = decode(data, info, reduction_for(box, geometry.resize, info.orientation), limits)
    decoded = time.perf_counter()
    # Map the box onto what was actually decoded (a reduced JPEG is about 1/n of the stored size).
    scale_x, scale_y = pixels.shape[1] / info.width, pixels.shape[0] / info.height
    left, top = int(round(box[0] * scale_x)), int(round(box[1] * scale_y))
    right = max(left + 1, int(round(box[2] * scale_x)))
    bottom = max(top + 1, int(round(box[3] * scale_y)))
    resize_h, resize_w = geometry.resize
    if info.orientation >= 5:
        resize_h, resize_w = resize_w, resize_h
    result = orient(_resize(pixels[top:bottom, left:right], resize_h, resize_w), info.orientation)
    if geometry.crop is not None:
        c_left, c_top, c_right, c_bottom = geometry.crop
        result = result[c_top:c_bottom, c_left:c_right]
    if geometry.flip:
        result = result.flip(1)
    torch.from_numpy(out).copy_(result)
    finished = time.perf_counter()
    times.decode += decoded - read_done
    times.augment += finished - decoded


def warm_up() -> None:
    """Run every pipeline once on a synthetic JPEG, so a worker's first real batch pays no
    one-time costs (torch kernel dispatch set-up, decoder tables, first page faults)."""
    import simplejpeg

    from stoker.server.imaging.pipelines import BUILTIN_PIPELINES

    gradient = np.linspace(0, 255, 320 * 480 * 3).astype(np.uint8).reshape(320, 480, 3)
    data = simplejpeg.encode_jpeg(gradient, quality=90, colorspace="RGB")
    out = np.empty((224, 224, 3), dtype=np.uint8)
    for key, pipeline in enumerate(BUILTIN_PIPELINES.values()):
        render_bytes(data, key, pipeline, 224, out, DecodeLimits(), StageTimes())
