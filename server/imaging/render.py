"""Render one sample: plan every view's crop from the image's header (:func:`plan_views`), decode once
at the reduction the views allow (:func:`decode_reduction`, the same rule on every server), and for each
view crop, resize once, orient, flip, run its post-ops, and write the result straight into its row of
the shared batch buffer (:func:`render_pixels`). The worker (``workers/process.py``) does the reading
and the decoded-sample cache around these steps; :func:`render_sample` does all of it for one local
file, as a reference.

Randomness: view ``v`` of a sample draws its geometry from ``SampleRng(view_key(key, v))`` (view 0
uses the sample's key itself, so single-view pipelines keep their bytes) and seeds the post-ops'
generators from ``post_ops_key(view_key(key, v))``.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from stoker.client.protocol.rng import SampleRng, mix
from stoker.server.data.locators import Locator
from stoker.server.imaging.decode import DecodeLimits, ImageInfo, decode, probe
from stoker.server.imaging.geometry import (
    Box,
    SampleGeometry,
    oriented_size,
    plan_geometry,
    raw_box,
    reduction_for,
    reduction_for_side,
)
from stoker.server.imaging.pipelines import Pipeline, View
from stoker.server.imaging.reading import read_local
from stoker.server.imaging.targets import SampleTargets, pad_crop

__all__ = [
    "StageTimes",
    "ViewPlan",
    "decode_reduction",
    "plan_views",
    "render_sample",
    "render_bytes",
    "render_pixels",
    "orient",
    "warm_up",
    "view_key",
    "post_ops_key",
]

_VIEW_DOMAIN = 0x56494557
_POST_OPS_DOMAIN = 0x504F5354


def view_key(key: int, view: int) -> int:
    """The RNG key of view ``view`` of the sample whose key is ``key``."""
    return key if view == 0 else mix(_VIEW_DOMAIN, key, view)


def post_ops_key(key: int) -> int:
    """The seed of the post-ops' generators for a view with key ``key``: apart from its geometry's."""
    return mix(_POST_OPS_DOMAIN, key)


@dataclass(slots=True)
class StageTimes:
    """Seconds and counts per stage, summed over the samples of a task. Stages: ``read`` and
    ``decode`` per sample, ``geometry`` and ``postops`` per view image, ``augment`` (both) per sample,
    and ``op:<pipeline>/<op>`` per image an op ran on."""

    seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, stage: str, seconds: float, count: int = 1) -> None:
        """Count ``count`` items that took ``seconds`` in all on ``stage``."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        self.counts[stage] = self.counts.get(stage, 0) + count

    def totals(self) -> tuple[tuple[str, float, int], ...]:
        """``(stage, seconds, count)`` for every stage seen."""
        return tuple((stage, seconds, self.counts[stage]) for stage, seconds in self.seconds.items())


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
    """``pixels`` (H x W x 3) resized to ``height x width``, as an H x W x 3 tensor.

    ``pixels`` may be a read-only view of the decoded-sample cache: what is returned never aliases
    it, so no post-op (an operator's plugin may work in place) can change a cached sample.
    """
    pixels = np.ascontiguousarray(pixels)
    if pixels.shape[0] == height and pixels.shape[1] == width:
        return torch.from_numpy(pixels if pixels.flags.writeable else pixels.copy())
    with warnings.catch_warnings():
        # interpolate only reads its input: a tensor over read-only memory is safe here.
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        tensor = torch.from_numpy(pixels)
    # Viewed as NCHW with a batch stride of H*W*3 (not 0 or 3) the tensor is unambiguously
    # channels_last, so interpolate keeps that layout and takes torch's vectorised uint8
    # antialiased path, as torchvision's tensor Resize does; the output is H x W x 3 already.
    h, w = pixels.shape[:2]
    batch = tensor.as_strided((1, 3, h, w), (h * w * 3, 1, w * 3, 3))
    out = F.interpolate(batch, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return out.permute(0, 2, 3, 1)[0]


Rows = np.ndarray | Sequence[np.ndarray]
"""Where a sample goes: its row (one view), or one row per view in declaration order."""


def render_sample(
    path: str | bytes | Locator,
    key: int,
    pipeline: Pipeline,
    size: int,
    out: Rows,
    limits: DecodeLimits,
    times: StageTimes,
    post: PostOpsRunner | None = None,
    min_side: int = 0,
) -> None:
    """Produce one sample from a local file into ``out`` (``size x size x 3`` ``uint8`` per view, or
    ``3 x size x size`` for the ``nchw`` layout),
    reading it as a worker does; raises ``BadImage`` for the file and ``PostOpError`` for a post-op."""
    started = time.perf_counter()
    locator = path if isinstance(path, Locator) else Locator(os.fsdecode(path))
    data = read_local(locator, limits)
    times.add("read", time.perf_counter() - started)
    render_bytes(data, key, pipeline, size, out, limits, times, post, min_side)


def render_bytes(
    data: bytes,
    key: int,
    pipeline: Pipeline,
    size: int,
    out: Rows,
    limits: DecodeLimits,
    times: StageTimes,
    post: PostOpsRunner | None = None,
    min_side: int = 0,
) -> None:
    """Like :func:`render_sample`, from the file's bytes: probe, plan every view, decode once at
    :func:`decode_reduction`, render."""
    started = time.perf_counter()
    info = probe(data, limits)
    plans = plan_views(info, key, pipeline, size)
    pixels = decode(data, info, decode_reduction(info, plans, min_side), limits)
    times.add("decode", time.perf_counter() - started)
    render_pixels(pixels, info, key, pipeline, size, out, times, post, plans)


ViewPlan = tuple[SampleGeometry, Box]
"""A view's geometry (upright coordinates) and its source box in stored coordinates."""


def plan_views(info: ImageInfo, key: int, pipeline: Pipeline, size: int) -> list[ViewPlan]:
    """Each view's plan, drawn from the sample's key: needs only the image's header."""
    width, height = oriented_size(info.width, info.height, info.orientation)
    plans = []
    for v, (view, side) in enumerate(zip(pipeline.expanded, pipeline.sizes(size), strict=True)):
        plan = plan_geometry(width, height, side, view, SampleRng(view_key(key, v)))
        plans.append((plan, raw_box(plan.box, info.width, info.height, info.orientation)))
    return plans


def decode_reduction(info: ImageInfo, plans: Sequence[ViewPlan], min_side: int = 0) -> int:
    """The DCT reduction a sample is decoded at: the same on every server, cached or not.

    ``min_side`` > 0 (its dataset's ``cache_min_side``): from the image alone, the largest that keeps
    its shorter side at least ``min_side``. Otherwise as far as the most demanding view allows (the
    decoded box stays at least its output size), so one decode serves every view.
    """
    if min_side > 0:
        return reduction_for_side(info.width, info.height, min_side) if info.jpeg else 1
    return min(reduction_for(box, plan.resize, info.orientation) for plan, box in plans)


def render_pixels(
    pixels: np.ndarray,
    info: ImageInfo,
    key: int,
    pipeline: Pipeline,
    size: int,
    out: Rows,
    times: StageTimes,
    post: PostOpsRunner | None = None,
    plans: Sequence[ViewPlan] | None = None,
    targets: SampleTargets | None = None,
) -> None:
    """Every view of a sample from its decoded ``pixels`` (fresh, or read from the cache) into ``out``;
    ``targets``' boxes and mask move with the first view (its geometry and post-ops)."""
    started = time.perf_counter()
    rows = [out] if isinstance(out, np.ndarray) else list(out)
    views, sizes = pipeline.expanded, pipeline.sizes(size)
    if len(rows) != len(views):
        raise ValueError(f"pipeline {pipeline.name!r} has {len(views)} views, got {len(rows)} rows")
    plans = plans if plans is not None else plan_views(info, key, pipeline, size)
    declared = [number for number, view in enumerate(pipeline.views) for _ in range(view.count)]
    for v, (view, side, (plan, box), row) in enumerate(zip(views, sizes, plans, rows, strict=True)):
        began = time.perf_counter()
        result = _geometry(pixels, info, box, plan)
        moving = targets if v == 0 and targets is not None and targets.geometric else None
        if moving is not None:
            moving.place(plan, info, side)
        placed = time.perf_counter()
        times.add("geometry", placed - began)
        if view.post_ops:
            if post is None:
                raise RuntimeError(f"pipeline {pipeline.name!r} has post-ops and no runner was given")
            ops_key = post_ops_key(view_key(key, v))
            chw = post.run(pipeline, declared[v], view, result, ops_key, side, times, moving)
            if chw.permute(1, 2, 0).is_contiguous():  # the fast kernels' native layout
                _place_hwc(row, chw.permute(1, 2, 0))
            elif row.shape[-1] == 3:
                planes = chw.numpy()
                for channel in range(3):  # a plane at a time: ~6x faster than one strided CHW-to-HWC copy
                    row[:, :, channel] = planes[channel]
            else:
                row[...] = chw.numpy()
            times.add("postops", time.perf_counter() - placed)
        else:
            _place_hwc(row, result)
    times.add("augment", time.perf_counter() - started)


def _place_hwc(row: np.ndarray, hwc: torch.Tensor) -> None:
    """An ``H x W x 3`` image into its row: an ``H x W x 3`` row (an ``nhwc`` job) or a ``3 x H x W``
    one (``nchw``; a side is at least 8, so the last axis tells them apart)."""
    if row.shape[-1] == 3:
        torch.from_numpy(row).copy_(hwc)
    else:  # OpenCV's split into the row's planes: ~6x faster than numpy's strided transpose copy
        cv2.split(np.ascontiguousarray(hwc.numpy()), [row[0], row[1], row[2]])


def _geometry(
    pixels: np.ndarray, info: ImageInfo, box: tuple[int, int, int, int], plan: SampleGeometry
) -> torch.Tensor:
    """The fused crop-resize-orient-crop-flip of one view, as an H x W x 3 tensor."""
    # Map the box onto what was actually decoded (a reduced JPEG is about 1/n of the stored size).
    scale_x, scale_y = pixels.shape[1] / info.width, pixels.shape[0] / info.height
    left, top = int(round(box[0] * scale_x)), int(round(box[1] * scale_y))
    right = max(left + 1, int(round(box[2] * scale_x)))
    bottom = max(top + 1, int(round(box[3] * scale_y)))
    resize_h, resize_w = plan.resize
    if info.orientation >= 5:
        resize_h, resize_w = resize_w, resize_h
    result = orient(_resize(pixels[top:bottom, left:right], resize_h, resize_w), info.orientation)
    if plan.crop is not None:
        c_left, c_top, c_right, c_bottom = plan.crop
        if c_left < 0 or c_top < 0 or c_right > result.shape[1] or c_bottom > result.shape[0]:
            result = _padded(result, plan.crop, plan.fill)  # letterbox: the crop reaches past the image
        else:
            result = result[c_top:c_bottom, c_left:c_right]
    if plan.flip:
        result = result.flip(1)
    return result


def _padded(image: torch.Tensor, crop: Box, fill: int) -> torch.Tensor:
    """``image[top:bottom, left:right]`` where the box reaches outside it: the rest is ``fill`` (the
    same padded crop a mask gets)."""
    return torch.from_numpy(pad_crop(image.numpy(), crop, fill))


class PostOpsRunner:
    """Runs a view's post-ops on the H x W x 3 result of its geometry (as the 3 x H x W image they
    take) and times each op; built ops are kept per pipeline and view."""

    def __init__(self) -> None:
        from stoker.server.imaging.postops import PostOps  # torchvision: only where post-ops run

        self._ops = PostOps()

    def run(
        self,
        pipeline: Pipeline,
        view_index: int,
        view: View,
        hwc: torch.Tensor,
        key: int,
        size: int,
        times: StageTimes,
        targets: SampleTargets | None = None,
    ) -> torch.Tensor:
        """The view's image after its post-ops, as the 3 x H x W tensor they return; ``targets``' boxes
        and mask, when given, move with the image (torchvision's own transforms on ``tv_tensors``)."""
        from stoker.server.imaging.postops import is_fast
        from stoker.server.imaging.targets import run_ops_with_targets

        ops = self._ops.ops(pipeline, view_index, view) if targets is None else None
        seconds: dict[str, float] = {}
        if ops is not None and is_fast(ops[0][1]):  # fast kernels work on the native H x W x 3: no transpose
            chw = torch.from_numpy(np.ascontiguousarray(hwc.numpy())).permute(2, 0, 1)
        else:
            # Contiguous CHW, as a decoded image is: torchvision's kernels are much slower on other
            # strides, and numpy makes the copy about twice as fast as torch's permute.
            chw = torch.from_numpy(np.ascontiguousarray(hwc.numpy().transpose(2, 0, 1)))
        try:
            if ops is None:
                return run_ops_with_targets(pipeline.name, view_index, view.post_ops, chw, targets, key, size, seconds)
            return self._ops.apply(ops, chw, key, size, seconds)
        finally:
            for label, spent in seconds.items():
                times.add(f"op:{pipeline.name}/{label}", spent)


def warm_up(limits: DecodeLimits) -> None:
    """Run every pipeline once on a synthetic JPEG, so a worker's first real batch pays no
    one-time costs (torch kernel dispatch set-up, decoder tables, first page faults)."""
    import simplejpeg

    from stoker.server.imaging.pipelines import BUILTIN_PIPELINES

    gradient = np.linspace(0, 255, 320 * 480 * 3).astype(np.uint8).reshape(320, 480, 3)
    data = simplejpeg.encode_jpeg(gradient, quality=90, colorspace="RGB")
    out = np.empty((224, 224, 3), dtype=np.uint8)
    for key, pipeline in enumerate(BUILTIN_PIPELINES.values()):
        render_bytes(data, key, pipeline, 224, out, limits, StageTimes())
