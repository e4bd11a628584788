"""Random erasing on the native ``H x W x 3`` layout: the box written in place of torchvision's clone.

torchvision's ``erase`` clones the image and assigns ``v`` (a ``3 x h x w`` or ``3 x 1 x 1`` value,
drawn by its ``RandomErasing``) to the box; the same assignment through an ``H x W x 3`` array gives
the same bytes with one copy of the box instead of the image.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["erase"]


def erase(image: np.ndarray, i: int, j: int, h: int, w: int, v: torch.Tensor, inplace: bool = False) -> np.ndarray:
    """``image`` with rows ``i:i+h`` and columns ``j:j+w`` set to ``v`` (cast as torch casts)."""
    out = image if inplace and image.flags.writeable else image.copy()
    box = torch.from_numpy(out[i : i + h, j : j + w])
    box.copy_(v.permute(1, 2, 0).expand(box.shape))
    return out
