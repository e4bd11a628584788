"""Pipelines: what a worker does to a sample, declared by name on the server.

A pipeline is one or more **views**. A view is one *geometry* (which source box is resized to what,
then optionally cropped, optionally mirrored: the fused decode-crop-resize fast path) followed by any
number of **post-ops** on the ``3 x H x W`` ``uint8`` image: torchvision v2 transforms by name (the
heavy ones on stoker's fast kernels unless ``exact = true``), or an operator's plugin. A multi-view
pipeline (self-supervised multi-crop) decodes a sample once and renders every view from it. Clients
name pipelines; code only comes from the server's environment.

This module is pure (no torch): it parses and checks declarations. :mod:`.postops` builds and runs the
post-ops inside workers.

Config forms (TOML)::

    [pipelines.timm_rand]
    ops = [
      {op = "random_resized_crop", scale = [0.08, 1.0]},
      {op = "hflip", p = 0.5},
      {op = "torchvision.RandAugment", num_ops = 2, magnitude = 9},
      {op = "plugin", call = "my_augs:Posterize", kwargs = {bits = 4}},
    ]

    [pipelines.dino]
    views = [
      {count = 2, size = 224, ops = [{op = "random_resized_crop", scale = [0.4, 1.0]}, {op = "hflip"}]},
      {count = 6, size = 96, ops = [{op = "random_resized_crop", scale = [0.05, 0.4]}, {op = "hflip"}]},
    ]
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "Pipeline",
    "View",
    "OpSpec",
    "BUILTIN_PIPELINES",
    "GEOMETRIES",
    "pipeline_from_ops",
    "pipeline_from_views",
]

Geometry = Literal["random_resized_crop", "resize_center_crop", "resize", "letterbox"]
GEOMETRIES: tuple[str, ...] = ("random_resized_crop", "resize_center_crop", "resize", "letterbox")
TORCHVISION_PREFIX = "torchvision."
CONTAINERS = frozenset({"RandomApply", "RandomChoice", "RandomOrder", "Compose"})
"""torchvision transforms of transforms: their ``transforms`` is a list of op tables in TOML."""
_PLUGIN_CALL = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_MAX_VIEWS = 64


def _frozen(value: Any) -> Any:
    """A hashable, immutable copy of a TOML value (lists become tuples, tables sorted pairs)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _thawed(value: Any, table: bool = False) -> Any:
    if table:
        return {k: _thawed(v) for k, v in value}
    if isinstance(value, tuple):
        return [_thawed(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class OpSpec:
    """One post-op: ``torchvision.NAME`` built with ``kwargs``, or a plugin ``module:attr`` called
    with ``kwargs`` to build the transform (once per worker)."""

    op: str
    """``torchvision.NAME`` or ``plugin``."""
    kwargs: tuple[tuple[str, Any], ...] = ()
    call: str | None = None
    """For ``plugin``: ``module:attribute`` in the server's own environment."""
    exact: bool = False
    """Run torchvision's own kernel even where stoker has a fast one (``exact = true``)."""
    children: tuple[OpSpec, ...] = ()
    """For ``torchvision.RandomApply`` / ``RandomChoice`` / ``RandomOrder`` / ``Compose``: the ops of its
    ``transforms`` list, each a table like any post-op."""

    @property
    def label(self) -> str:
        """How the op is named in errors and stage timings."""
        return f"plugin {self.call}" if self.op == "plugin" else self.op

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments as plain Python values (lists, dicts)."""
        return {name: _thawed(value) for name, value in self.kwargs}

    def describe(self) -> dict[str, Any]:
        """JSON-ready, for ``/status``."""
        out: dict[str, Any] = {"op": self.op, **self.arguments()}
        if self.call is not None:
            out = {"op": self.op, "call": self.call, "kwargs": self.arguments()}
        if self.exact:
            out["exact"] = True
        if self.children:
            out["transforms"] = [child.describe() for child in self.children]
        return out


@dataclass(frozen=True, slots=True)
class View:
    """One output image per sample: a geometry, then post-ops. ``size`` ``None`` means the job's
    ``image_size``; ``count`` repeats the view (each copy draws its own random parameters)."""

    geometry: Geometry
    scale: tuple[float, float] = (0.08, 1.0)
    """random_resized_crop: range of the crop's share of the image area."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """random_resized_crop: range of the crop's aspect ratio (width / height)."""
    resize_ratio: float = 256 / 224
    """resize_center_crop: the shorter side is resized to ``image_size * resize_ratio`` first."""
    hflip: float = 0.0
    """Probability of a horizontal flip."""
    post_ops: tuple[OpSpec, ...] = ()
    size: int | None = None
    count: int = 1
    fill: int = 114
    """letterbox: the value of the padding (114, YOLO's grey, by default)."""

    def __post_init__(self) -> None:
        if not isinstance(self.fill, int) or isinstance(self.fill, bool) or not 0 <= self.fill <= 255:
            raise ValueError(f"fill={self.fill!r} must be an int in [0, 255]")
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
        if self.size is not None and not (isinstance(self.size, int) and 8 <= self.size <= 4096):
            raise ValueError(f"size={self.size!r} must be an int in [8, 4096]")
        if not isinstance(self.count, int) or not 1 <= self.count <= _MAX_VIEWS:
            raise ValueError(f"count={self.count!r} must be an int in [1, {_MAX_VIEWS}]")

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description for ``/status`` and error messages."""
        out: dict[str, Any] = {"geometry": self.geometry, "hflip": self.hflip}
        if self.geometry == "random_resized_crop":
            out.update(scale=list(self.scale), ratio=list(self.ratio))
        elif self.geometry == "resize_center_crop":
            out.update(resize_ratio=self.resize_ratio)
        elif self.geometry == "letterbox":
            out.update(fill=self.fill)
        if self.size is not None:
            out["size"] = self.size
        if self.count != 1:
            out["count"] = self.count
        out["post_ops"] = [op.describe() for op in self.post_ops]
        return out


@dataclass(frozen=True, slots=True)
class Pipeline:
    """A named, validated pipeline: its views in declaration order."""

    name: str
    views: tuple[View, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.views:
            raise ValueError(f"pipeline {self.name!r} has no view")
        if sum(view.count for view in self.views) > _MAX_VIEWS:
            raise ValueError(f"pipeline {self.name!r}: at most {_MAX_VIEWS} views per sample")

    @property
    def expanded(self) -> tuple[View, ...]:
        """One entry per output image (``count`` repeats a view)."""
        return tuple(view for view in self.views for _ in range(view.count))

    @property
    def multi_view(self) -> bool:
        """Whether a sample yields more than one image (or a size of its own): the client then gets a
        list of tensors, one per view."""
        return len(self.expanded) > 1 or any(view.size is not None for view in self.views)

    @property
    def has_post_ops(self) -> bool:
        """Whether any view runs post-ops (code beyond the fused geometry)."""
        return any(view.post_ops for view in self.views)

    def sizes(self, image_size: int) -> tuple[int, ...]:
        """The side of each output image, with the job's ``image_size`` where a view has none."""
        return tuple(view.size or image_size for view in self.expanded)

    def describe(self) -> dict[str, Any]:
        """JSON-ready, for ``/status``."""
        return {"name": self.name, "views": [view.describe() for view in self.views]}


BUILTIN_PIPELINES: Mapping[str, Pipeline] = {
    # torchvision's RandomResizedCrop(size) + RandomHorizontalFlip() with their default parameters.
    "train": Pipeline("train", (View("random_resized_crop", hflip=0.5),)),
    # torchvision's Resize(size * 256 / 224) + CenterCrop(size).
    "eval": Pipeline("eval", (View("resize_center_crop"),)),
    "resize": Pipeline("resize", (View("resize"),)),
}


def _pair(value: Any, key: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(v, (int, float)) for v in value):
        raise ValueError(f"{key}={value!r} must be a pair of numbers")
    return float(value[0]), float(value[1])


def _geometry(first: Mapping[str, Any]) -> dict[str, Any]:
    op = first.get("op")
    if op not in GEOMETRIES:
        raise ValueError(f"the first op {op!r} must be a geometry, one of {GEOMETRIES}")
    allowed = {
        "random_resized_crop": {"scale", "ratio"},
        "resize_center_crop": {"resize_ratio"},
        "resize": set(),
        "letterbox": {"fill"},
    }[op]
    params: dict[str, Any] = {"geometry": op}
    for key, value in first.items():
        if key == "op":
            continue
        if key not in allowed:
            raise ValueError(f"op {op!r} has no parameter {key!r}; it takes {sorted(allowed)}")
        if key == "fill":
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"fill={value!r} must be an int in [0, 255]")
            params[key] = value
            continue
        params[key] = _pair(value, key) if key in ("scale", "ratio") else float(value)
    return params


def _post_op(position: int, entry: Mapping[str, Any], exact: bool = False) -> OpSpec:
    op = entry.get("op")
    where = f"op {position} {op!r}"
    if not isinstance(op, str):
        raise ValueError(f"op {position} has no 'op' name")
    if op == "plugin":
        extra = set(entry) - {"op", "call", "kwargs"}
        call, kwargs = entry.get("call"), entry.get("kwargs", {})
        if extra:
            raise ValueError(f"{where}: a plugin takes only 'call' and 'kwargs', not {sorted(extra)}")
        if not isinstance(call, str) or not _PLUGIN_CALL.match(call):
            raise ValueError(f"{where}: call={call!r} must be 'module:attribute'")
        if not isinstance(kwargs, Mapping):
            raise ValueError(f"{where}: kwargs must be a table")
        return OpSpec("plugin", _frozen(kwargs), call)
    if op == "hflip":
        raise ValueError(f"{where} must come right after the geometry (or use torchvision.RandomHorizontalFlip)")
    if op.startswith(TORCHVISION_PREFIX) and op[len(TORCHVISION_PREFIX) :].isidentifier():
        own = entry.get("exact", False)
        if not isinstance(own, bool):
            raise ValueError(f"{where}: exact={own!r} must be true or false")
        kwargs = {k: v for k, v in entry.items() if k not in ("op", "exact")}
        children: tuple[OpSpec, ...] = ()
        nested = kwargs.get("transforms")
        if op[len(TORCHVISION_PREFIX) :] in CONTAINERS and isinstance(nested, list):
            if not nested or not all(isinstance(child, Mapping) for child in nested):
                raise ValueError(f"{where}: transforms must be a non-empty list of op tables")
            children = tuple(_post_op(position, child, own or exact) for child in nested)
            del kwargs["transforms"]
        return OpSpec(op, _frozen(kwargs), exact=own or exact, children=children)
    raise ValueError(
        f"{where} is not known: after the geometry come 'hflip', 'torchvision.NAME' "
        "(a torchvision.transforms.v2 transform) or 'plugin'"
    )


def view_from_ops(ops: list[Mapping[str, Any]], size: int | None = None, count: int = 1, exact: bool = False) -> View:
    """One view from an op list: a geometry first, then an optional ``hflip``, then post-ops
    (``exact``: every torchvision op runs torchvision's own kernel)."""
    if not isinstance(ops, list) or not ops or not all(isinstance(op, Mapping) for op in ops):
        raise ValueError("ops must be a non-empty list of tables")
    first, *rest = ops
    params = _geometry(first)
    post_ops: list[OpSpec] = []
    for position, entry in enumerate(rest, start=1):
        if entry.get("op") == "hflip" and not post_ops:
            if set(entry) - {"op", "p"}:
                raise ValueError(f"op {position} 'hflip' takes only 'p'")
            params["hflip"] = float(entry.get("p", 0.5))
        else:
            post_ops.append(_post_op(position, entry, exact))
    return View(**params, post_ops=tuple(post_ops), size=size, count=count)


def pipeline_from_ops(name: str, ops: list[Mapping[str, Any]], exact: bool = False) -> Pipeline:
    """A single-view pipeline from an op list (its size is the job's ``image_size``)."""
    try:
        return Pipeline(name, (view_from_ops(ops, exact=exact),))
    except ValueError as exc:
        raise ValueError(f"pipeline {name!r}: {exc}") from None


def pipeline_from_views(name: str, views: list[Mapping[str, Any]], exact: bool = False) -> Pipeline:
    """A multi-view pipeline: each entry ``{count, size, ops}``."""
    if not isinstance(views, list) or not views:
        raise ValueError(f"pipeline {name!r}: views must be a non-empty list of tables")
    built = []
    for number, entry in enumerate(views):
        if not isinstance(entry, Mapping) or set(entry) - {"count", "size", "ops"} or "ops" not in entry:
            raise ValueError(f"pipeline {name!r}: view {number} must be a table of 'ops' and optional 'count', 'size'")
        try:
            built.append(view_from_ops(entry["ops"], entry.get("size"), entry.get("count", 1), exact))
        except ValueError as exc:
            raise ValueError(f"pipeline {name!r}: view {number}: {exc}") from None
    return Pipeline(name, tuple(built))
