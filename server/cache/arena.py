"""The decoded-sample arena: one shared-memory segment that holds decoded images for every worker.

Entries are written once, by the worker that decoded the sample, at an offset it reserves with a
shared bump pointer; every worker reads them in place (a numpy view of the mapping, nothing copied
into its heap). Nothing is ever freed: once the budget is spent, the arena keeps what it holds (an
LRU would thrash when every epoch touches every sample in a new order). Which entries are valid is
the engine's record, not the arena's: an entry counts only once its worker has reported it, so a
worker killed half way through a write leaves bytes nobody will read, never a corrupt entry.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from multiprocessing import shared_memory
from multiprocessing.context import BaseContext
from multiprocessing.sharedctypes import Synchronized

import numpy as np

__all__ = ["Arena", "ArenaHandle", "ArenaView"]

log = logging.getLogger(__name__)
_ALIGN = 64  # entries start on cache lines


@dataclass(frozen=True)
class ArenaHandle:
    """What a worker needs to open the arena: its name and size, and the shared bump pointer."""

    name: str
    size: int
    pointer: Synchronized  # type: ignore[type-arg]


class Arena:
    """The server's arena: creates the segment and the pointer; ``close`` unlinks the segment."""

    def __init__(self, size: int, context: BaseContext) -> None:
        self.size = size
        self._shm = shared_memory.SharedMemory(
            name=f"stoker-arena-{os.getpid()}-{os.urandom(3).hex()}", create=True, size=max(size, 1)
        )
        # A lock-protected counter: reserving is one fetch-and-add, made by whichever worker decodes.
        self._pointer = context.Value("q", 0)
        self.handle = ArenaHandle(self._shm.name, size, self._pointer)

    @property
    def used(self) -> int:
        """Bytes reserved so far (entries, and any space of entries never reported)."""
        return min(int(self._pointer.value), self.size)

    def close(self) -> None:
        """Unlink the segment (workers' mappings go with them)."""
        with contextlib.suppress(BufferError):
            self._shm.close()
        with contextlib.suppress(FileNotFoundError):
            self._shm.unlink()

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ArenaView:
    """A worker's mapping of the arena."""

    def __init__(self, handle: ArenaHandle) -> None:
        self.handle = handle
        self._shm = shared_memory.SharedMemory(name=handle.name)
        self._bytes = np.ndarray((handle.size,), dtype=np.uint8, buffer=self._shm.buf)

    def reserve(self, nbytes: int) -> int | None:
        """An offset for ``nbytes``, or ``None`` when the budget is spent."""
        size = -(-nbytes // _ALIGN) * _ALIGN
        pointer = self.handle.pointer
        with pointer.get_lock():
            offset = int(pointer.value)
            if offset + size > self.handle.size:
                return None
            pointer.value = offset + size
        return offset

    def write(self, offset: int, pixels: np.ndarray) -> None:
        """Copy ``pixels`` (H x W x 3 ``uint8``) to ``offset``."""
        self._bytes[offset : offset + pixels.nbytes].reshape(pixels.shape)[...] = pixels

    def read(self, offset: int, shape: tuple[int, int, int]) -> np.ndarray:
        """The entry at ``offset`` as a read-only H x W x 3 view."""
        nbytes = shape[0] * shape[1] * shape[2]
        view = self._bytes[offset : offset + nbytes].reshape(shape)
        view.flags.writeable = False
        return view

    def close(self) -> None:
        """Unmap."""
        del self._bytes
        with contextlib.suppress(BufferError):
            self._shm.close()
