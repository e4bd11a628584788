"""What the engine and a worker say to each other about the decoded-sample cache: plain frozen records
that travel in a task's message and its result."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CacheEntry", "SampleHeader", "CachePart"]


@dataclass(frozen=True, slots=True)
class SampleHeader:
    """What rendering needs of an image's header when its pixels come from the arena: the stored size
    (to map crop boxes onto the decoded pixels), the EXIF orientation, and whether it is a JPEG (only
    JPEGs decode reduced)."""

    width: int
    height: int
    orientation: int
    jpeg: bool


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One decoded copy of a sample in the arena: where it is, its decoded size, and the DCT reduction
    (1, 2, 4 or 8) it was decoded at. A sample may have one entry per reduction its views asked for."""

    offset: int
    height: int
    width: int
    reduction: int


@dataclass(frozen=True, slots=True)
class CachePart:
    """A sample's part in the cache, as a task tells its worker: its header and entries so far (none
    yet: the worker reads and probes the file), and whether this task may write a new entry (it holds
    the sample's claim)."""

    header: SampleHeader | None = None
    entries: tuple[CacheEntry, ...] = ()
    store: bool = False

    def entry(self, reduction: int) -> CacheEntry | None:
        """The entry decoded at ``reduction``, if the arena has one."""
        return next((entry for entry in self.entries if entry.reduction == reduction), None)
