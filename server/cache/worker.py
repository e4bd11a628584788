"""A worker's side of the decoded-sample cache (worker process): read an entry in place, or write a
freshly decoded sample into the arena when the task holds the sample's claim."""

from __future__ import annotations

import numpy as np

from stoker.server.cache.arena import ArenaHandle, ArenaView
from stoker.server.cache.entries import CacheEntry, CachePart

__all__ = ["WorkerCache"]


class WorkerCache:
    """The arena as one worker maps it (``None`` handle: the server runs without a cache)."""

    def __init__(self, handle: ArenaHandle | None) -> None:
        self._view = ArenaView(handle) if handle is not None else None

    def read(self, part: CachePart | None, reduction: int) -> np.ndarray | None:
        """The sample's pixels decoded at ``reduction``, as a read-only view of the arena, if cached."""
        entry = part.entry(reduction) if part is not None and self._view is not None else None
        if entry is None or self._view is None:
            return None
        return self._view.read(entry.offset, (entry.height, entry.width, 3))

    def store(self, part: CachePart | None, pixels: np.ndarray, reduction: int) -> CacheEntry | None:
        """Write ``pixels`` (decoded at ``reduction``) when the task holds the claim; ``None`` when it
        does not, or once the budget is spent. The entry counts only once the engine has the result."""
        if part is None or not part.store or self._view is None:
            return None
        offset = self._view.reserve(pixels.nbytes)
        if offset is None:
            return None
        self._view.write(offset, pixels)
        height, width = pixels.shape[:2]
        return CacheEntry(offset, height, width, reduction)

    def close(self) -> None:
        """Unmap the arena."""
        if self._view is not None:
            self._view.close()
