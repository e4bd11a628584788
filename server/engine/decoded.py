"""The engine's record of the decoded-sample cache: which samples of which cached datasets are in the
arena (and where), who is decoding what right now, and the figures ``/status`` shows.

An entry exists only once the worker that wrote it has reported it, so what the record lists is always
whole. Each sample of a cached dataset is decoded once while the budget lasts: the first task to need
it claims it; a row of another batch that needs it meanwhile is parked, and goes on, reading the
arena, once the claim is settled.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from stoker.server.workers.arena import Arena
from stoker.server.workers.messages import CacheEntry

__all__ = ["DecodedCache"]

Sample = tuple[str, int]
"""``(dataset, index)``."""


@dataclass
class _Dataset:
    """One cached dataset's entries as arrays (offset -1: not cached) and its decode counts."""

    offsets: np.ndarray
    shapes: np.ndarray
    """``height, width, stored width, stored height, orientation, jpeg`` per sample."""
    decodes: np.ndarray

    @classmethod
    def sized(cls, samples: int) -> _Dataset:
        return cls(
            np.full(samples, -1, dtype=np.int64),
            np.zeros((samples, 6), dtype=np.int32),
            np.zeros(samples, dtype=np.uint16),
        )


class DecodedCache:
    """Entries, claims and parked rows of the cached datasets; ``arena`` ``None`` when the budget is 0."""

    def __init__(self, arena: Arena | None, min_sides: dict[str, int]) -> None:
        self.arena = arena
        self.min_sides = dict(min_sides)
        """Cached datasets, with the shorter side their images are decoded down to (0: full size)."""
        self._datasets: dict[str, _Dataset] = {}
        self._claims: dict[Sample, object] = {}
        self._parked: dict[Sample, list[Any]] = {}
        self.hits = 0
        self.misses = 0

    def declared(self, dataset: str) -> bool:
        """Whether ``dataset`` is declared cached (its decode rule is the cache's, budget or not)."""
        return dataset in self.min_sides

    def _table(self, dataset: str, samples: int) -> _Dataset:
        table = self._datasets.get(dataset)
        if table is None:
            table = self._datasets[dataset] = _Dataset.sized(samples)
        return table

    def entry(self, dataset: str, index: int, samples: int) -> CacheEntry | None:
        """Where sample ``index`` is in the arena, if it is."""
        table = self._table(dataset, samples)
        offset = int(table.offsets[index])
        if offset < 0:
            return None
        height, width, stored_width, stored_height, orientation, jpeg = (int(v) for v in table.shapes[index])
        return CacheEntry(offset, height, width, stored_width, stored_height, orientation, bool(jpeg))

    def claim(self, sample: Sample, task: object) -> bool:
        """``task`` decodes ``sample`` (``True``), or another task already is (``False``: park the row)."""
        holder = self._claims.setdefault(sample, task)
        return holder is task

    def park(self, sample: Sample, waiting: Any) -> None:
        """Hold ``waiting`` (a batch row) until ``sample``'s claim is settled."""
        self._parked.setdefault(sample, []).append(waiting)

    def settle(self, sample: Sample, task: object) -> list[Any]:
        """``task`` is done with ``sample`` (decoded, stored or not, or dropped); the rows it held up."""
        if self._claims.get(sample) is task:
            del self._claims[sample]
            return self._parked.pop(sample, [])
        return []

    def decoded(self, sample: Sample, samples: int, stored: CacheEntry | None) -> None:
        """A worker decoded ``sample`` (and wrote it to the arena, when ``stored``)."""
        table = self._table(sample[0], samples)
        table.decodes[sample[1]] = min(int(table.decodes[sample[1]]) + 1, 65535)
        self.misses += 1
        if stored is not None:
            table.offsets[sample[1]] = stored.offset
            table.shapes[sample[1]] = (
                stored.height,
                stored.width,
                stored.stored_width,
                stored.stored_height,
                stored.orientation,
                int(stored.jpeg),
            )

    def hit(self, count: int = 1) -> None:
        """Samples read from the arena instead of decoded."""
        self.hits += count

    def view(self) -> dict[str, Any]:
        """JSON-ready, for ``/status``: budget, use, entries, hits, misses, decodes per sample."""
        entries = sum(int((table.offsets >= 0).sum()) for table in self._datasets.values())
        decoded = [table.decodes[table.decodes > 0] for table in self._datasets.values()]
        total = sum(int(d.sum()) for d in decoded)
        distinct = sum(len(d) for d in decoded)
        return {
            "budget_bytes": self.arena.size if self.arena is not None else 0,
            "used_bytes": self.arena.used if self.arena is not None else 0,
            "entries": entries,
            "hits": self.hits,
            "misses": self.misses,
            "decodes_per_sample": round(total / distinct, 4) if distinct else None,
            "datasets": sorted(self.min_sides),
        }

    def pending(self) -> Iterable[Sample]:
        """Samples claimed right now (for tests and ``/status``)."""
        return list(self._claims)
