"""The DataLoader form of a stoker pipeline, for bench row (b): the same work in the usual
torchvision way, on ``uint8`` tensors: ``RandomResizedCrop`` / ``Resize`` + ``CenterCrop`` /
``Resize`` and ``RandomHorizontalFlip`` for the geometry, then the very same post-ops (the same v2
transforms and plugins, built by the same code as the server's, with torchvision's own kernels: the
``exact`` form), once per view of a decoded image."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torchvision.transforms import v2

from stoker.server.imaging.pipelines import OpSpec, Pipeline, View
from stoker.server.imaging.postops import build_op

__all__ = ["recipe_transform"]


def _view_transform(view: View, size: int) -> v2.Transform:
    if view.geometry == "random_resized_crop":
        steps: list[Callable[..., Any]] = [
            v2.RandomResizedCrop(size, scale=view.scale, ratio=view.ratio, antialias=True)
        ]
    elif view.geometry == "resize_center_crop":
        steps = [v2.Resize(int(size * view.resize_ratio), antialias=True), v2.CenterCrop(size)]
    else:
        steps = [v2.Resize((size, size), antialias=True)]
    if view.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(view.hflip))
    # torchvision's own kernels: this row is the DataLoader running the torchvision recipe.
    steps += [build_op(_exact(op)) for op in view.post_ops]
    return v2.Compose(steps)


def _exact(op: OpSpec) -> OpSpec:
    return replace(op, exact=True, children=tuple(_exact(child) for child in op.children))


class _Views:
    """Every view of one decoded image: a list of tensors, as stoker's client yields them."""

    def __init__(self, transforms: list[v2.Transform]) -> None:
        self.transforms = transforms

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [transform(image) for transform in self.transforms]


def recipe_transform(pipeline: Pipeline, image_size: int) -> Callable[[torch.Tensor], Any]:
    """A transform of a decoded ``3 x H x W`` ``uint8`` image doing ``pipeline``'s work."""
    sizes = pipeline.sizes(image_size)
    transforms = [_view_transform(view, size) for view, size in zip(pipeline.expanded, sizes, strict=True)]
    return _Views(transforms) if pipeline.multi_view else transforms[0]
