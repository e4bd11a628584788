"""Pipelines: what a worker does to a decoded image, declared by name on the server.

A pipeline is one *geometry* (which source box is resized to what, then optionally cropped) plus
optional horizontal flipping. Keeping it declarative (no code from the network, no pickles) lets the
server plan DCT-domain downscaling before decoding and lets clients pick a pipeline by name only.

Config form (TOML)::

    [pipelines.train_small]
    ops = [{op = "random_resized_crop", scale = [0.35, 1.0]}, {op = "hflip", p = 0.5}]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

__all__ = ["Pipeline", "BUILTIN_PIPELINES", "pipeline_from_ops", "GEOMETRIES"]

Geometry = Literal["random_resized_crop", "resize_center_crop", "resize"]
GEOMETRIES: tuple[str, ...] = ("random_resized_crop", "resize_center_crop", "resize")


@dataclass(frozen=True, slots=True)
class Pipeline:
    """A named, validated pipeline. Output is always ``image_size x image_size x 3`` ``uint8``."""

    name: str
    geometry: Geometry
    scale: tuple[float, float] = (0.08, 1.0)
    """random_resized_crop: range of the crop's share of the image area."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """random_resized_crop: range of the crop's aspect ratio (width / height)."""
    resize_ratio: float = 256 / 224
    """resize_center_crop: the shorter side is resized to ``image_size * resize_ratio`` first."""
    hflip: float = 0.0
    """Probability of a horizontal flip."""

    def __post_init__(self) -> None:
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry={self.geometry!r} must be one of {GEOMETRIES}")
        low, high = self.scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"scale={self.scale!r} must satisfy 0 < low <= high <= 1")
        low, high = self.ratio
        if not 0.0 < low <= high or not math.isfinite(high):
            raise ValueError(f"ratio={self.ratio!r} must satisfy 0 < low <= high")
        if not 1.0 <= self.resize_ratio <= 8.0:
            raise ValueError(f"resize_ratio={self.resize_ratio!r} must be in [1, 8]")
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"hflip={self.hflip!r} must be a probability in [0, 1]")

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description for ``/status`` and error messages."""
        out: dict[str, Any] = {"geometry": self.geometry, "hflip": self.hflip}
        if self.geometry == "random_resized_crop":
            out.update(scale=list(self.scale), ratio=list(self.ratio))
        elif self.geometry == "resize_center_crop":
            out.update(resize_ratio=self.resize_ratio)
        return out


BUILTIN_PIPELINES: Mapping[str, Pipeline] = {
    # torchvision's RandomResizedCrop(size) + RandomHorizontalFlip() with their default parameters.
    "train": Pipeline("train", "random_resized_crop", hflip=0.5),
    # torchvision's Resize(size * 256 / 224) + CenterCrop(size).
    "eval": Pipeline("eval", "resize_center_crop"),
    "resize": Pipeline("resize", "resize"),
}


def _pair(value: Any, field: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(v, (int, float)) for v in value):
        raise ValueError(f"{field}={value!r} must be a pair of numbers")
    return float(value[0]), float(value[1])


def pipeline_from_ops(name: str, ops: list[Mapping[str, Any]]) -> Pipeline:
    """Build a pipeline from a declarative op list: one geometry op, then optional ``hflip``."""
    if not ops or not isinstance(ops, list):
        raise ValueError(f"pipeline {name!r}: ops must be a non-empty list")
    first, *rest = ops
    op = first.get("op")
    if op not in GEOMETRIES:
        raise ValueError(f"pipeline {name!r}: first op {op!r} must be one of {GEOMETRIES}")
    params: dict[str, Any] = {}
    allowed = {"random_resized_crop": {"scale", "ratio"}, "resize_center_crop": {"resize_ratio"}, "resize": set()}[op]
    for key, value in first.items():
        if key == "op":
            continue
        if key not in allowed:
            raise ValueError(f"pipeline {name!r}: op {op!r} has no parameter {key!r}; it takes {sorted(allowed)}")
        params[key] = _pair(value, key) if key in ("scale", "ratio") else float(value)
    pipeline = Pipeline(name, op, **params)
    for extra in rest:
        if extra.get("op") != "hflip" or set(extra) - {"op", "p"}:
            raise ValueError(f"pipeline {name!r}: after the geometry only {{op = 'hflip', p = ...}} is allowed")
        pipeline = replace(pipeline, hflip=float(extra.get("p", 0.5)))
    return pipeline
