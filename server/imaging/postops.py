"""Post-ops: torchvision v2 transforms and operator plugins run on a view after its geometry.

A ``torchvision.NAME`` op with a fast kernel (:mod:`stoker.server.imaging.kernels`) is built as its
fast subclass unless the op says ``exact``; fast ops pass the image on in the worker's native
``H x W x 3`` layout (seen as ``3 x H x W``), and an op without one (a plugin, another torchvision
transform) gets the contiguous ``3 x H x W`` tensor it always had.

Built from declarations (:class:`~stoker.server.imaging.pipelines.OpSpec`) once per worker, and once at
server start to refuse what cannot work (an unknown name, bad arguments, a transform that needs a
batch or does not return a ``uint8`` image) with the op and the reason. Before a view's post-ops run,
torch's, Python's and numpy's global generators are seeded from the view's key, so transforms written
with the usual RNG calls draw the same numbers for a sample wherever and whenever it is rendered.
"""

from __future__ import annotations

import importlib
import random
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from stoker.server.imaging.errors import PostOpError
from stoker.server.imaging.pipelines import TORCHVISION_PREFIX, OpSpec, Pipeline, View

__all__ = [
    "PostOpError",
    "PostOps",
    "build_op",
    "is_fast",
    "seed_generators",
    "validate_pipelines",
    "check_output",
    "BATCH_ONLY",
]

Transform = Callable[[torch.Tensor], Any]
BATCH_ONLY = frozenset({"MixUp", "CutMix"})
"""v2 transforms that mix samples: they need a batch and labels, so they belong on the trainer."""
_MAX_TRACEBACK_CHARS = 8000


def _import_call(call: str) -> Any:
    module_name, _, attribute = call.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def build_op(spec: OpSpec) -> Transform:
    """The callable for one post-op; raises ``ValueError`` saying why it cannot be built."""
    kwargs = spec.arguments()
    if spec.op == "plugin":
        try:
            factory = _import_call(spec.call or "")
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import {spec.call!r} from the server's environment: {exc}") from exc
        try:
            built = factory(**kwargs)
        except Exception as exc:  # the plugin's own validation, whatever its type
            raise ValueError(f"{spec.call}(**{kwargs}) raised {type(exc).__name__}: {exc}") from exc
        if not callable(built):
            raise ValueError(f"{spec.call}(**{kwargs}) returned {type(built).__name__}, not a callable transform")
        return built
    from torchvision.transforms import v2

    from stoker.server.imaging.kernels.transforms import FAST_TRANSFORMS

    name = spec.op[len(TORCHVISION_PREFIX) :]
    cls = getattr(v2, name, None) if spec.exact else FAST_TRANSFORMS.get(name, getattr(v2, name, None))
    if not (isinstance(cls, type) and issubclass(cls, v2.Transform)):
        raise ValueError(f"torchvision.transforms.v2 has no transform {name!r}")
    if name in BATCH_ONLY:
        raise ValueError(f"{name} mixes samples and needs a batch with labels: apply it on the trainer's GPU")
    if spec.children:
        kwargs["transforms"] = [build_op(child) for child in spec.children]
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad arguments {kwargs}: {exc}") from exc


def seed_generators(key: int) -> None:
    """Seed torch's, Python's and numpy's global generators from a 64-bit key."""
    # The CPU generator only: torch.manual_seed also seeds every accelerator's (about 0.25 ms a
    # call), and post-ops run in workers that use none.
    torch.default_generator.manual_seed(key)
    random.seed(key)
    np.random.seed(key & 0xFFFFFFFF)


def is_fast(op: Transform) -> bool:
    """Whether ``op`` runs stoker's fast kernels (and so takes the native layout as it is)."""
    from torchvision.transforms import v2

    from stoker.server.imaging.kernels.transforms import FastKernels

    if isinstance(op, (v2.RandomApply, v2.RandomChoice, v2.RandomOrder, v2.Compose)):
        return all(is_fast(child) for child in op.transforms)
    return isinstance(op, FastKernels)


def _run(ops: Iterable[tuple[str, Transform]], image: torch.Tensor, times: dict[str, float]) -> torch.Tensor:
    for label, op in ops:
        started = time.perf_counter()
        if not image.is_contiguous() and not is_fast(op):
            image = image.contiguous()  # plugins and torchvision's kernels get the 3 x H x W they expect
        try:
            image = op(image)
        except Exception as exc:  # the op's failure is the pipeline's, reported with its traceback
            raise PostOpError(
                label, f"{type(exc).__name__}: {exc}", traceback.format_exc()[-_MAX_TRACEBACK_CHARS:]
            ) from exc
        times[label] = times.get(label, 0.0) + time.perf_counter() - started
        if not isinstance(image, torch.Tensor):
            raise PostOpError(label, f"returned {type(image).__name__}; post-ops take and return a 3 x H x W tensor")
    return image


def check_output(image: torch.Tensor, size: int, last: str) -> None:
    """Refuse a post-op result that is not the view's ``3 x size x size`` ``uint8`` image."""
    if image.dtype != torch.uint8 or tuple(image.shape) != (3, size, size):
        shape = "x".join(str(d) for d in image.shape)
        raise PostOpError(last, f"returned {shape} {image.dtype}; the view's output is 3x{size}x{size} torch.uint8")


class PostOps:
    """A worker's built post-ops, per pipeline and view, built on first use."""

    def __init__(self) -> None:
        self._built: dict[tuple[str, int], tuple[tuple[str, Transform], ...]] = {}

    def ops(self, pipeline: Pipeline, view_index: int, view: View) -> tuple[tuple[str, Transform], ...]:
        """The built post-ops of one view of ``pipeline`` (``view_index`` counts declared views)."""
        cache_key = (pipeline.name, view_index)
        built = self._built.get(cache_key)
        if built is None:
            built = self._built[cache_key] = tuple((op.label, build_op(op)) for op in view.post_ops)
        return built

    def apply(
        self, ops: tuple[tuple[str, Transform], ...], image: torch.Tensor, key: int, size: int, times: dict[str, float]
    ) -> torch.Tensor:
        """Run ``ops`` on ``image`` (``3 x H x W`` ``uint8``) with generators seeded from ``key``."""
        seed_generators(key)
        result = _run(ops, image, times)
        check_output(result, size, ops[-1][0])
        return result


def validate_pipelines(pipelines: Iterable[Pipeline]) -> None:
    """Build every post-op and run it once on a small image; raise ``ValueError`` naming the
    pipeline, the op and the reason for the first that cannot work."""
    sample = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for pipeline in pipelines:
        for number, view in enumerate(pipeline.views):
            for position, spec in enumerate(view.post_ops, start=1):
                where = f"pipeline {pipeline.name!r}, view {number}, post-op {position} {spec.label!r}"
                try:
                    op = build_op(spec)
                    seed_generators(0)
                    result = _run([(spec.label, op)], sample, {})
                except ValueError as exc:
                    raise ValueError(f"{where}: {exc}") from exc.__cause__
                except PostOpError as exc:
                    raise ValueError(f"{where} cannot run on one image: {exc.reason}") from exc.__cause__
                if result.dtype != torch.uint8 or result.ndim != 3 or result.shape[0] != 3:
                    shape = "x".join(str(d) for d in result.shape)
                    raise ValueError(f"{where} returns {shape} {result.dtype}; post-ops must return 3 x H x W uint8")
