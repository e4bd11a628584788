"""The native layout: an ``H x W x 3`` ``uint8`` array, seen by torchvision as a ``3 x H x W`` tensor.

A fast op takes the tensor torchvision's transform hands its kernel, works on the ``H x W x 3`` array
under it (no copy when the tensor is already a channel-last view, as the worker's images are), and
hands back its result as a ``3 x H x W`` view of an ``H x W x 3`` array: consecutive fast ops never
change layout, and the worker writes the last one into its slot row with one copy.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["as_hwc", "as_chw", "is_image", "is_native"]


def is_image(tensor: object) -> bool:
    """Whether ``tensor`` is a plain ``3 x H x W`` ``uint8`` CPU image (what the fast kernels take)."""
    return (
        type(tensor) is torch.Tensor
        and tensor.dtype == torch.uint8
        and tensor.ndim == 3
        and tensor.shape[0] == 3
        and tensor.device.type == "cpu"
    )


def is_native(tensor: torch.Tensor) -> bool:
    """Whether ``3 x H x W`` ``tensor`` is a view of a contiguous ``H x W x 3`` array."""
    return tensor.ndim == 3 and tensor.permute(1, 2, 0).is_contiguous()


def as_hwc(tensor: torch.Tensor) -> np.ndarray:
    """The ``H x W x 3`` array under a ``3 x H x W`` tensor (a copy only when it is not native)."""
    return np.ascontiguousarray(tensor.permute(1, 2, 0).numpy())


def as_chw(array: np.ndarray) -> torch.Tensor:
    """An ``H x W x 3`` array as the ``3 x H x W`` tensor post-ops exchange (a view)."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
