"""Delivery: finished batches to the clients waiting for them, zero-copy, and a small cache of them.

A finished batch's slot is sent as is (``copy=False``); ZeroMQ's tracker says when the kernel has
the bytes and the slot may be reused. The last ``cache_batches`` finished batches stay in their
slots, so a retry or a second trainer running the same job is answered without decoding again.
Slots are reference counted: the batch in work, the cache and each send in flight hold one each.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from stoker.client.protocol.wire import ErrorCode, Kind, encode
from stoker.server.engine.records import BatchKey, BatchWork, CachedBatch, PendingSend, where
from stoker.server.engine.stats import EngineStats
from stoker.server.engine.targets import targets_frame
from stoker.server.engine.transport import Transport
from stoker.server.workers.slots import SlotPool

__all__ = ["Delivery"]

log = logging.getLogger(__name__)


class Delivery:
    """Sends finished batches and errors; keeps recent batches and the sends still in flight."""

    def __init__(self, transport: Transport, slots: SlotPool, stats: EngineStats) -> None:
        self.transport = transport
        self.slots = slots
        self.stats = stats
        self._cache: OrderedDict[BatchKey, CachedBatch] = OrderedDict()
        self._sends: list[PendingSend] = []

    @property
    def sending(self) -> int:
        """Sends whose buffer ZeroMQ still holds."""
        return len(self._sends)

    def cached(self, key: BatchKey) -> CachedBatch | None:
        """A finished batch still in the cache (counted as recently used)."""
        batch = self._cache.get(key)
        if batch is not None:
            self._cache.move_to_end(key)
        return batch

    def complete(self, work: BatchWork, recipients: Mapping[bytes, float], cache_batches: int) -> list[bytes]:
        """Send a finished batch to ``recipients`` (identity -> when it asked) and cache it; return
        the recipients it could not be sent to. Takes over the work's slot reference."""
        slot = work.slot
        if slot is None:
            raise RuntimeError(f"batch {work.key} finished without a slot")  # unreachable: settled works have one
        self.stats.stage("batch", time.monotonic() - work.dispatched_at)
        job = work.job
        shapes = job.view_shapes(len(work.indices))
        fields = {
            "job_id": job.job_id,
            **where(work.key),
            "dtype": "uint8",
            "shape": shapes[0],
            "labels": job.table.labels[work.indices].tolist(),
            "indices": work.indices.tolist(),
        }
        if job.pipeline.multi_view:
            fields["views"] = shapes  # the image bytes hold every view's array, one after another
        if job.mixture is not None:  # a mixture's rows: the source of each and the index in that source
            sources = job.table.source_of(work.indices)  # type: ignore[attr-defined]
            fields["sources"] = sources.tolist()
            fields["indices"] = (work.indices - job.table.offsets[sources]).tolist()  # type: ignore[attr-defined]
            self.stats.mixtures.delivered(job, work.key[1], work.key[3])
        rows = len(work.indices)
        frame = None
        if job.targets:
            fields["targets"] = [name for name, _ in job.targets]
            frame = targets_frame(job, work)
            if job.mask_side:
                fields["mask"] = [rows, job.mask_side, job.mask_side]
        header = encode(Kind.BATCH, fields)
        images = job.image_nbytes(rows)
        batch = CachedBatch(slot, header, images, rows, work.nbytes - images, frame)
        unsent = [
            identity for identity, asked_at in recipients.items() if not self.send(identity, work.key, batch, asked_at)
        ]
        if cache_batches:
            self._cache[work.key] = batch
            self.slots.retain(slot)
            self.trim_cache(cache_batches)
        self.slots.release(slot)
        return unsent

    def fail(self, work: BatchWork, recipients: Mapping[bytes, float]) -> None:
        """Tell every recipient why the batch failed. Takes over the work's slot reference."""
        failure = work.failure
        if failure is None:
            raise RuntimeError(f"batch {work.key} has not failed")  # unreachable: called for failed works
        for identity in recipients:
            self.error(identity, failure.fields(work.key))
        if work.slot is not None:
            self.slots.release(work.slot)

    def error(self, identity: bytes, fields: dict[str, Any]) -> None:
        """Send an ``ERROR`` (counted by code)."""
        self.stats.error(ErrorCode(fields["code"]).name)
        self.transport.send(identity, Kind.ERROR, fields)

    def send(self, identity: bytes, key: BatchKey, batch: CachedBatch, asked_at: float) -> bool:
        """Hand a batch to ZeroMQ; ``False`` when the client is gone."""
        tail: list[Any] = []
        if batch.mask_nbytes:
            tail.append(batch.slot.view(batch.nbytes + batch.mask_nbytes)[batch.nbytes :])
        if batch.targets is not None:
            tail.append(batch.targets)
        tracker = self.transport.send_batch(
            identity, batch.header, batch.slot.view(batch.nbytes), batch.nbytes // batch.images, tail
        )
        if tracker is None:
            return False
        self.slots.retain(batch.slot)
        self._sends.append(
            PendingSend(tracker, batch.slot, identity, key, batch.nbytes, batch.images, asked_at, time.monotonic())
        )
        return True

    def reap(self, now: float) -> list[PendingSend]:
        """Sends whose bytes the kernel now has: their slots are released and they are counted."""
        if not self._sends:
            return []
        done: list[PendingSend] = []
        still: list[PendingSend] = []
        for send in self._sends:  # read each tracker once: it may turn done between two reads
            (done if send.tracker.done else still).append(send)
        self._sends = still
        for send in done:
            self.slots.release(send.slot)
            self.stats.stage("send", now - send.started_at)
            self.stats.delivered(send.images, send.nbytes, now - send.requested_at)
        return done

    def trim_cache(self, cache_batches: int) -> None:
        """Keep at most ``cache_batches`` finished batches, dropping the least recently used."""
        while len(self._cache) > cache_batches:
            _, evicted = self._cache.popitem(last=False)
            self.slots.release(evicted.slot)

    def close(self) -> None:
        """Forget sends and cache (the slots are unlinked with the pool)."""
        self._sends.clear()
        self._cache.clear()
