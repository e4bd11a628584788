"""The auto-augment families (AutoAugment, RandAugment, TrivialAugmentWide, AugMix) on fast kernels.

torchvision draws each op and its magnitude in ``forward`` and applies it in
``_apply_image_or_video_transform``; the subclasses here keep ``forward`` (the draws) and send each
op to the fast kernel with the arguments torchvision passes. AugMix mixes its chains in float with
torchvision's own code. Batched inputs (AugMix's ``1 x 3 x H x W``) run per image.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import _get_fill

from stoker.server.imaging.kernels.transforms import FastKernels, run_kernel

__all__ = ["AUTO_AUGMENT"]


def _apply(image: torch.Tensor, transform_id: str, magnitude: float, interpolation: Any, fill: Any) -> Any:
    """One auto-augment op, with the arguments torchvision's dispatch gives its functional; ``None``
    for an op this does not know (torchvision's dispatch runs it)."""
    if transform_id == "Identity":
        return image
    if transform_id in ("ShearX", "ShearY"):
        degrees = math.degrees(math.atan(magnitude))
        shear = [degrees, 0.0] if transform_id == "ShearX" else [0.0, degrees]
        return run_kernel(
            F.affine, image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear,
            interpolation=interpolation, fill=fill, center=[0, 0],
        )  # fmt: skip
    if transform_id in ("TranslateX", "TranslateY"):
        translate = [int(magnitude), 0] if transform_id == "TranslateX" else [0, int(magnitude)]
        return run_kernel(
            F.affine, image, angle=0.0, translate=translate, scale=1.0, interpolation=interpolation,
            shear=[0.0, 0.0], fill=fill,
        )  # fmt: skip
    simple = {
        "Rotate": (F.rotate, {"angle": magnitude, "interpolation": interpolation, "fill": fill}),
        "Brightness": (F.adjust_brightness, {"brightness_factor": 1.0 + magnitude}),
        "Color": (F.adjust_saturation, {"saturation_factor": 1.0 + magnitude}),
        "Contrast": (F.adjust_contrast, {"contrast_factor": 1.0 + magnitude}),
        "Sharpness": (F.adjust_sharpness, {"sharpness_factor": 1.0 + magnitude}),
        "Posterize": (F.posterize, {"bits": int(magnitude)}),
        "Solarize": (F.solarize, {"threshold": 255.0 * magnitude}),
        "AutoContrast": (F.autocontrast, {}),
        "Equalize": (F.equalize, {}),
        "Invert": (F.invert, {}),
    }.get(transform_id)
    if simple is None:
        return None
    functional, kwargs = simple
    return run_kernel(functional, image, **kwargs)


class _FastAutoAugment(FastKernels):
    def _apply_image_or_video_transform(
        self, image: Any, transform_id: str, magnitude: float, interpolation: Any, fill: Any
    ) -> Any:
        if type(image) is torch.Tensor and image.dtype == torch.uint8 and image.ndim in (3, 4):
            fill_ = _get_fill(fill, type(image))
            if image.ndim == 3:
                out = _apply(image, transform_id, magnitude, interpolation, fill_)
            else:
                parts = [_apply(one, transform_id, magnitude, interpolation, fill_) for one in image]
                out = None if any(p is None for p in parts) else torch.stack(parts)
            if out is not None:
                return out
        return super()._apply_image_or_video_transform(image, transform_id, magnitude, interpolation, fill)  # type: ignore[misc]


def _fast(base: type[v2.Transform]) -> type[v2.Transform]:
    return type(base.__name__, (_FastAutoAugment, base), {"__module__": __name__, "__doc__": base.__doc__})


AUTO_AUGMENT: dict[str, type[v2.Transform]] = {
    name: _fast(getattr(v2, name)) for name in ("AutoAugment", "RandAugment", "TrivialAugmentWide", "AugMix")
}
