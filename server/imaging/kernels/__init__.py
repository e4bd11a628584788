"""Fast ``uint8`` kernels for torchvision's heavy transforms (OpenCV, one thread).

``torchvision.NAME`` post-ops named in :data:`FAST_TRANSFORMS` run as subclasses of torchvision's own
transforms (same arguments, same parameter draws from the same seeded generators) whose kernels are
OpenCV calls or lookup tables on the worker's native ``H x W x 3`` layout, within a documented bound of
torchvision's bytes (README, "Fast kernels"); ``exact = true`` on an op, or ``exact_torchvision = true``
on a pipeline, runs torchvision's. Modules: :mod:`.colour`, :mod:`.blur`, :mod:`.geometry`,
:mod:`.erasing` (the kernels), :mod:`.autoaugment` (the auto-augment families), :mod:`.transforms`
(the dispatch), :mod:`.layout` (the native layout).
"""

from __future__ import annotations

import cv2

__all__ = ["FAST_TRANSFORMS", "single_thread"]


def single_thread() -> None:
    """One OpenCV thread in this process: the worker pool is the parallelism."""
    cv2.setNumThreads(1)


def __getattr__(name: str) -> object:
    if name == "FAST_TRANSFORMS":  # torchvision is imported only where post-ops are built
        from stoker.server.imaging.kernels.transforms import FAST_TRANSFORMS

        return FAST_TRANSFORMS
    raise AttributeError(name)
