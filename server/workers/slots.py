"""Batch buffers in shared memory: workers write samples into them, the transport sends from them.

A slot is one POSIX shared-memory segment holding one batch. Slots are reused (a job's batches all
have the same size), so pages are faulted in once, and a byte budget bounds the total. The segment is
registered with multiprocessing's resource tracker, which unlinks it even if the server is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
from multiprocessing import shared_memory

import numpy as np

__all__ = ["Slot", "SlotPool", "SlotViews", "fit_budget"]

log = logging.getLogger(__name__)
_ALIGN = 1 << 20  # round segment sizes up to 1 MiB so slightly different batch sizes share slots


class Slot:
    """One shared-memory batch buffer; ``refs`` counts its users (a batch in work, cache, sends)."""

    __slots__ = ("name", "capacity", "_shm", "refs")

    def __init__(self, name: str, capacity: int) -> None:
        self._shm = shared_memory.SharedMemory(name=name, create=True, size=capacity)
        self.name = name
        self.capacity = capacity
        self.refs = 0

    def view(self, nbytes: int) -> memoryview:
        """The first ``nbytes`` of the segment, for zero-copy sends."""
        return self._shm.buf[:nbytes]

    def destroy(self) -> None:
        """Unlink the segment; it is freed once no worker maps it any more."""
        try:
            self._shm.close()
        except BufferError:
            # A send still references the buffer (shutdown with sends in flight); unlinking is enough.
            log.debug("slot %s still exported at destroy; unlinking only", self.name)
        with contextlib.suppress(FileNotFoundError):
            self._shm.unlink()


class SlotPool:
    """Hands out slots of at least a requested size within ``max_bytes`` in total."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._free: list[Slot] = []
        self._all: dict[str, Slot] = {}
        self._names = itertools.count()
        self._prefix = f"stoker-{os.getpid()}-{os.urandom(3).hex()}"
        self.destroyed: list[str] = []
        """Names destroyed since the engine last read this; workers are told to unmap them."""

    @property
    def total_bytes(self) -> int:
        """Bytes of all segments, free or in use."""
        return sum(slot.capacity for slot in self._all.values())

    @property
    def in_use(self) -> int:
        """Slots currently held by batches, the cache or sends."""
        return len(self._all) - len(self._free)

    def acquire(self, nbytes: int) -> Slot | None:
        """A slot of at least ``nbytes`` with one reference, or ``None`` when the budget is spent."""
        fitting = [slot for slot in self._free if slot.capacity >= nbytes]
        if fitting:
            slot = min(fitting, key=lambda s: s.capacity)
            self._free.remove(slot)
            slot.refs = 1
            return slot
        capacity = -(-nbytes // _ALIGN) * _ALIGN
        # Free slots of the wrong size make room for the new one before the budget says no.
        while self._free and self.total_bytes + capacity > self.max_bytes:
            self._discard(self._free.pop(0))
        if self._all and self.total_bytes + capacity > self.max_bytes:
            return None
        slot = Slot(f"{self._prefix}-{next(self._names)}", capacity)
        self._all[slot.name] = slot
        slot.refs = 1
        return slot

    def retain(self, slot: Slot) -> None:
        """Add a reference."""
        slot.refs += 1

    def release(self, slot: Slot) -> None:
        """Drop a reference; the last one returns the slot to the free list."""
        slot.refs -= 1
        if slot.refs == 0:
            self._free.append(slot)
        elif slot.refs < 0:
            raise RuntimeError(f"slot {slot.name} released more often than acquired")

    def _discard(self, slot: Slot) -> None:
        del self._all[slot.name]
        slot.destroy()
        self.destroyed.append(slot.name)

    def close(self) -> None:
        """Unlink every segment."""
        for slot in list(self._all.values()):
            slot.destroy()
        self._all.clear()
        self._free.clear()

    def __enter__(self) -> SlotPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SlotViews:
    """A worker's mappings of slots, by name, kept open across tasks (mapping costs page faults)."""

    def __init__(self) -> None:
        self._open: dict[str, shared_memory.SharedMemory] = {}

    def array(self, name: str, nbytes: int) -> np.ndarray:
        """A writable ``uint8`` array over the first ``nbytes`` of slot ``name``."""
        shm = self._open.get(name)
        if shm is None:
            shm = self._open[name] = shared_memory.SharedMemory(name=name)
        return np.ndarray((nbytes,), dtype=np.uint8, buffer=shm.buf)

    def forget(self, name: str) -> None:
        """Unmap a slot the engine destroyed."""
        shm = self._open.pop(name, None)
        if shm is not None:
            shm.close()

    def close(self) -> None:
        """Unmap everything."""
        for name in list(self._open):
            self.forget(name)


def fit_budget(budget: int, mount: str = "/dev/shm") -> int:
    """The shared-memory budget, cut to what the shm mount can hold. A container's /dev/shm is often
    64 MiB; writing past it kills the writer with SIGBUS, so better a smaller budget and a warning."""
    try:
        free = shutil.disk_usage(mount).free
    except OSError:
        return budget
    usable = int(free * 0.9)
    if budget > usable:
        log.warning(
            "shared-memory budget %d MiB exceeds what %s can hold (%d MiB free); using %d MiB. "
            "Give the container more (docker --shm-size, a Memory emptyDir) or lower max_shm_mb.",
            budget // 2**20,
            mount,
            free // 2**20,
            usable // 2**20,
        )
        return max(usable, 2**20)
    return budget
