"""Receive buffers: pinned host memory reused across batches when the client feeds a CUDA device.

Pinning is slow (a ``cudaHostAlloc`` per buffer), so buffers are kept and reused. A buffer goes back
to the pool only when the non-blocking copy that reads it has finished, which a CUDA event records.
"""

from __future__ import annotations

import logging
from collections import deque

import torch

__all__ = ["PinnedPool"]

log = logging.getLogger(__name__)


class PinnedPool:
    """At most ``capacity`` pinned ``uint8`` buffers; :meth:`take` reuses a finished one when it fits."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free: list[torch.Tensor] = []
        self._busy: deque[tuple[torch.Tensor, torch.cuda.Event]] = deque()
        self.allocated = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """A pinned buffer of at least ``nbytes``, no longer read by any copy."""
        self._collect()
        for i, buffer in enumerate(self._free):
            if buffer.numel() >= nbytes:
                return self._free.pop(i)
        if self.allocated >= self.capacity and self._busy:
            # Every buffer is still being copied from: wait for the oldest copy instead of pinning more.
            buffer, event = self._busy.popleft()
            event.synchronize()
            if buffer.numel() >= nbytes:
                return buffer
            self.allocated -= 1
        while self._free and self.allocated >= self.capacity:
            self._free.pop(0)
            self.allocated -= 1
        self.allocated += 1
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def give_back(self, buffer: torch.Tensor, stream: torch.cuda.Stream | None = None) -> None:
        """Return ``buffer`` once the work queued on ``stream`` so far (its copy) is done."""
        event = torch.cuda.Event()
        event.record(stream)
        self._busy.append((buffer, event))

    def _collect(self) -> None:
        while self._busy and self._busy[0][1].query():
            self._free.append(self._busy.popleft()[0])

    def close(self) -> None:
        """Wait for pending copies and drop every buffer."""
        for _, event in self._busy:
            event.synchronize()
        self._busy.clear()
        self._free.clear()
        self.allocated = 0
