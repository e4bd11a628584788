"""The engine's side of the decoded-sample cache (engine thread): which samples are in the arena and
where, which task holds each sample's claim, the rows parked behind a claim, and the figures ``/status``
shows. The protocol is drawn in :mod:`stoker.server.cache`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from stoker.server.cache.arena import Arena
from stoker.server.cache.entries import CacheEntry, CachePart, SampleHeader

__all__ = ["DecodedCache", "Sample"]

log = logging.getLogger(__name__)

Sample = tuple[str, int]
"""``(dataset, index)``."""


@dataclass
class _Dataset:
    """One cached dataset's entries as arrays. Most samples have one entry (every view asked for the
    same reduction); the first is kept in arrays, any other reduction in a small dict."""

    offsets: np.ndarray
    """The first entry's offset (-1: not cached)."""
    entries: np.ndarray
    """The first entry's ``height, width, reduction`` per sample."""
    headers: np.ndarray
    """``stored width, stored height, orientation, jpeg`` per sample."""
    decodes: np.ndarray
    more: dict[int, tuple[CacheEntry, ...]]
    """Entries at other reductions, by sample index."""

    @classmethod
    def sized(cls, samples: int) -> _Dataset:
        return cls(
            np.full(samples, -1, dtype=np.int64),
            np.zeros((samples, 3), dtype=np.int32),
            np.zeros((samples, 4), dtype=np.int32),
            np.zeros(samples, dtype=np.uint16),
            {},
        )

    def part(self, index: int) -> tuple[SampleHeader | None, tuple[CacheEntry, ...]]:
        offset = int(self.offsets[index])
        if offset < 0:
            return None, ()
        width, height, orientation, jpeg = (int(v) for v in self.headers[index])
        first = CacheEntry(offset, *(int(v) for v in self.entries[index]))
        return SampleHeader(width, height, orientation, bool(jpeg)), (first, *self.more.get(index, ()))

    def add(self, index: int, entry: CacheEntry, header: SampleHeader) -> None:
        if self.offsets[index] < 0:
            self.offsets[index] = entry.offset
            self.entries[index] = (entry.height, entry.width, entry.reduction)
            self.headers[index] = (header.width, header.height, header.orientation, int(header.jpeg))
        else:
            self.more[index] = (*self.more.get(index, ()), entry)


class DecodedCache:
    """Entries, claims and parked rows of the cached datasets; ``arena`` is ``None`` when the budget is 0
    (the datasets are still declared cached: their decode rule is the same with or without it)."""

    def __init__(self, arena: Arena | None, datasets: Iterable[str]) -> None:
        self.arena = arena
        self.datasets = frozenset(datasets)
        """Datasets declared cached."""
        self._tables: dict[str, _Dataset] = {}
        self._claims: dict[Sample, object] = {}
        self._held: dict[object, set[Sample]] = {}
        self._parked: dict[Sample, list[Any]] = {}
        self.hits = 0
        self.misses = 0

    def serves(self, dataset: str) -> bool:
        """Whether rows of ``dataset`` go through the cache (declared cached, and an arena exists)."""
        return self.arena is not None and dataset in self.datasets

    def _table(self, dataset: str, samples: int) -> _Dataset:
        table = self._tables.get(dataset)
        if table is None:
            table = self._tables[dataset] = _Dataset.sized(samples)
        return table

    # -- the protocol ----------------------------------------------------------------------------

    def part(self, holder: object, sample: Sample, samples: int, waiting: Any) -> CachePart | None:
        """What ``holder`` (a task) tells its worker about ``sample``: it holds the sample's claim, so it
        may store what it decodes. ``None`` when the row ``waiting`` is parked instead, because another
        task holds the claim: that task may be decoding the very reduction this row needs (which only a
        worker knows, from the sample's header and crop), so waiting for it decodes each once."""
        if not self._claim(sample, holder):
            self._parked.setdefault(sample, []).append(waiting)
            return None
        header, entries = self._table(sample[0], samples).part(sample[1])
        return CachePart(header, entries, store=True)

    def _claim(self, sample: Sample, holder: object) -> bool:
        if self._claims.setdefault(sample, holder) is not holder:
            return False
        self._held.setdefault(holder, set()).add(sample)
        return True

    def reported(
        self,
        sample: Sample,
        samples: int,
        decoded: bool,
        stored: CacheEntry | None = None,
        header: SampleHeader | None = None,
    ) -> None:
        """A worker rendered ``sample``: read from the arena, or ``decoded`` (and written to the arena as
        ``stored``, whose header is ``header``)."""
        table = self._table(sample[0], samples)
        if not decoded:
            self.hits += 1
            return
        self.misses += 1
        table.decodes[sample[1]] = min(int(table.decodes[sample[1]]) + 1, 65535)
        if stored is not None and header is not None:
            table.add(sample[1], stored, header)

    def release(self, holder: object, sample: Sample | None = None) -> list[Any]:
        """``holder`` is done with ``sample`` (every sample it claimed, when ``None``): its claims settle
        and the rows parked behind them are returned, to be asked for again."""
        held = self._held.get(holder, set())
        if sample is None:
            done = list(held)
        elif sample in held:
            done = [sample]
        else:
            return []
        woken: list[Any] = []
        for one in done:
            held.discard(one)
            if self._claims.get(one) is holder:
                del self._claims[one]
                woken += self._parked.pop(one, [])
        if not held:
            self._held.pop(holder, None)
        return woken

    # -- figures ---------------------------------------------------------------------------------

    @property
    def budget_bytes(self) -> int:
        """The arena's size (0: off)."""
        return self.arena.size if self.arena is not None else 0

    @property
    def used_bytes(self) -> int:
        """Bytes reserved in the arena."""
        return self.arena.used if self.arena is not None else 0

    @property
    def entries(self) -> int:
        """Samples held decoded (at one reduction or more)."""
        return sum(int((table.offsets >= 0).sum()) for table in self._tables.values())

    @property
    def copies(self) -> int:
        """Decoded copies held: one per sample and reduction (``entries`` or a little more)."""
        return self.entries + sum(len(more) for table in self._tables.values() for more in table.more.values())

    @property
    def decodes_per_sample(self) -> float | None:
        """Mean decodes per sample decoded at least once (1.0: each decoded once per reduction)."""
        decoded = [table.decodes[table.decodes > 0] for table in self._tables.values()]
        distinct = sum(len(d) for d in decoded)
        return round(sum(int(d.sum()) for d in decoded) / distinct, 4) if distinct else None

    @property
    def claimed(self) -> list[Sample]:
        """Samples being decoded for the cache right now."""
        return list(self._claims)

    def close(self) -> None:
        """Unlink the arena."""
        if self.arena is not None:
            self.arena.close()
