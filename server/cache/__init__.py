"""The decoded-sample cache: decode each sample once per server, serve later reads from shared memory.

One concept, one home. Three parts, each named by where it runs:

- :mod:`.arena` — the shared-memory segment. The engine creates it (:class:`Arena`); every worker maps
  it (:class:`ArenaView`), reserves space with a shared bump pointer, writes an entry once and reads
  entries in place. Nothing is freed: once the budget is spent what is cached stays (an LRU would
  thrash when every epoch touches every sample in a new order).
- :mod:`.record` — the engine thread's record (:class:`DecodedCache`): which samples have entries and
  where, who holds each sample's claim, which rows wait behind a claim, hits and misses.
- :mod:`.worker` — a worker's side (:class:`WorkerCache`): read an entry, or store what it decoded.

What a task tells its worker about a sample is a :class:`CachePart` (the header and entries so far, and
whether this task may store); what the worker reports back is in its sample result.

**Bytes.** A sample's decode reduction (1, 2, 4 or 8 in the DCT domain) follows one rule on every server,
cached or not (:func:`stoker.server.imaging.render.decode_reduction`): from the crop of its views, or
from the image alone when its dataset declares ``cache_min_side``. An entry is keyed by that reduction,
so pixels read from the arena are exactly the pixels a fresh decode gives, and a cached server's
batches are byte-identical to an uncached one's. A sample may hold one entry per reduction its views
asked for (most hold one).

**Protocol per sample of a cached dataset** (engine thread)::

    stateDiagram-v2
        [*] --> absent
        absent --> claimed: a task's row needs it (part: the task may decode and store)
        claimed --> claimed: another task's row needs it (part returns None: the row is parked)
        claimed --> cached: the worker reports an entry (written whole before it reported)
        claimed --> absent: released without an entry (budget spent, bad file, batch failed, quarantined)
        cached --> claimed_cached: a task's row needs it (reads its entry, or decodes and stores the
            reduction its views need when the arena holds another)
        claimed_cached --> cached: released
        note right of claimed: release() hands the parked rows back, to be asked for again

Whoever holds a sample's claim is the only task touching it, so each (sample, reduction) is decoded
once per server: a row of another task waits the few milliseconds until the claim is released.

A worker killed half way through a write leaves bytes nobody reads: an entry counts only once its result
has arrived. Bad samples are never cached. A restarted server starts cold.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from stoker.server.cache.arena import Arena, ArenaHandle, ArenaView
from stoker.server.cache.entries import CacheEntry, CachePart, SampleHeader
from stoker.server.cache.record import DecodedCache, Sample
from stoker.server.cache.worker import WorkerCache

__all__ = [
    "Arena",
    "ArenaHandle",
    "ArenaView",
    "CacheEntry",
    "CachePart",
    "DecodedCache",
    "Sample",
    "SampleHeader",
    "WorkerCache",
    "open_cache",
]

log = logging.getLogger(__name__)
_MIN_ARENA_BYTES = 2**20


def open_cache(datasets: Iterable[str], budget_bytes: int, fits: int, context: object) -> DecodedCache:
    """The cache of ``datasets`` (those declared cached) with an arena of ``budget_bytes``, cut to
    ``fits`` (what the shared-memory mount holds beside the batch slots); no arena when either is 0."""
    names = list(datasets)
    if not names or budget_bytes <= 0:
        return DecodedCache(None, names)
    if fits < budget_bytes:
        log.warning("decoded-sample cache cut to %d MiB to fit the shared-memory mount", max(fits, 0) // 2**20)
    if fits <= 0:
        return DecodedCache(None, names)
    return DecodedCache(Arena(max(fits, _MIN_ARENA_BYTES), context), names)  # type: ignore[arg-type]
