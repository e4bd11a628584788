"""torchvision's transforms with their kernels swapped for the fast ones.

Each fast transform is a subclass of torchvision's own class: constructed with the same arguments,
validated by the same code, and drawing its parameters with the same code from the same seeded
generators (so the draws, and the order of the draws, are torchvision's). Only ``_call_kernel`` (and,
for the auto-augment families, the op dispatch) changes: a torchvision functional with a fast kernel
runs that kernel on the native layout; a kernel that returns ``None`` for its arguments, and any
other functional, runs torchvision's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from stoker.server.imaging.kernels import blur, colour, erasing, geometry
from stoker.server.imaging.kernels.layout import as_chw, as_hwc, is_image

__all__ = ["FAST_TRANSFORMS", "KERNELS", "run_kernel", "FastKernels"]

KERNELS: dict[Callable[..., Any], Callable[..., Any]] = {
    F.adjust_brightness: colour.adjust_brightness,
    F.adjust_contrast: colour.adjust_contrast,
    F.adjust_saturation: colour.adjust_saturation,
    F.adjust_hue: colour.adjust_hue,
    F.adjust_sharpness: colour.adjust_sharpness,
    F.rgb_to_grayscale: colour.rgb_to_grayscale,
    F.solarize: colour.solarize,
    F.posterize: colour.posterize,
    F.invert: colour.invert,
    F.autocontrast: colour.autocontrast,
    F.equalize: colour.equalize,
    F.gaussian_blur: blur.gaussian_blur,
    F.rotate: geometry.rotate,
    F.affine: geometry.affine,
    F.perspective: geometry.perspective,
    F.erase: erasing.erase,
}
"""torchvision functional -> fast kernel on ``H x W x 3`` ``uint8`` (same arguments after the image)."""


def run_kernel(functional: Callable[..., Any], inpt: Any, *args: Any, **kwargs: Any) -> Any:
    """``functional(inpt, ...)`` through its fast kernel where it has one for these arguments, else
    torchvision's (on a contiguous copy: its kernels are slow on other strides)."""
    kernel = KERNELS.get(functional)
    if kernel is not None and is_image(inpt):
        out = kernel(as_hwc(inpt), *args, **kwargs)
        if out is not None:
            return as_chw(out)
    if isinstance(inpt, torch.Tensor) and type(inpt) is torch.Tensor:
        inpt = inpt.contiguous()
    return functional(inpt, *args, **kwargs)


class FastKernels:
    """Mixin for a torchvision transform: its kernels go through :func:`run_kernel`."""

    def _call_kernel(self, functional: Callable[..., Any], inpt: Any, *args: Any, **kwargs: Any) -> Any:
        return run_kernel(functional, inpt, *args, **kwargs)


def _fast(base: type[v2.Transform]) -> type[v2.Transform]:
    return type(base.__name__, (FastKernels, base), {"__module__": __name__, "__doc__": base.__doc__})


_SIMPLE = (
    "ColorJitter",
    "Grayscale",
    "RandomGrayscale",
    "GaussianBlur",
    "RandomSolarize",
    "RandomPosterize",
    "RandomEqualize",
    "RandomAutocontrast",
    "RandomAdjustSharpness",
    "RandomInvert",
    "RandomRotation",
    "RandomAffine",
    "RandomPerspective",
    "RandomErasing",
)


def _build() -> dict[str, type[v2.Transform]]:
    from stoker.server.imaging.kernels.autoaugment import AUTO_AUGMENT

    table = {name: _fast(getattr(v2, name)) for name in _SIMPLE}
    table.update(AUTO_AUGMENT)
    return table


FAST_TRANSFORMS: dict[str, type[v2.Transform]] = _build()
"""``torchvision.NAME`` -> the fast subclass run by default (``exact = true`` runs torchvision's)."""
