"""Which batches to ask the servers for, in which order: the rest of the epoch being served (a
DataLoader worker's share of it), then the next epoch whole, kept one epoch ahead of the consumer so
epochs flow without a gap. The :class:`BatchStream` doing the asking is kept while the consumer
continues where it points, and replaced when the consumer goes elsewhere."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch.utils.data import get_worker_info

from stoker.client.protocol.job import JobSpec
from stoker.client.protocol.plan import Span
from stoker.client.runtime.session import Session
from stoker.client.runtime.stream import BatchStream

__all__ = ["Feed", "worker_share"]


def worker_share(ks: range) -> tuple[range, bool]:
    """The batches of ``ks`` this process yields, and whether it is one of several DataLoader workers.

    Inside ``DataLoader(num_workers=n)`` worker ``i`` takes every ``n``-th batch, and DataLoader's
    round-robin over workers restores the order; each worker copy tracks its own progress.
    """
    worker = get_worker_info()
    if worker is None or worker.num_workers <= 1:
        return ks, False
    return ks[worker.id :: worker.num_workers], True


class Feed:
    """The stream of batches this client asks for, and what it asks for next."""

    def __init__(self, spec: JobSpec) -> None:
        self._spec = spec
        self._stream: BatchStream | None = None

    def stream(
        self,
        session: Session,
        epoch: int,
        ks: list[int],
        span: Span | None,
        epoch_batches: int,
        lookahead: bool,
    ) -> BatchStream:
        """A stream heading for batches ``ks`` of ``epoch`` (of its ``span``, a resumed epoch), then,
        with ``lookahead``, the ``epoch_batches`` of the next epoch: the current stream when it is
        already heading for ``(epoch, ks[0])``, else a new one (the old one is dropped)."""
        stream = self._stream
        if stream is not None and lookahead and ks and stream.next_item == (epoch, ks[0]):
            return stream
        self.drop()
        if span is not None:
            session.resume(epoch, replace(self._spec, span=span))
        items = [(epoch, k) for k in ks]
        if lookahead:
            items += [(epoch + 1, k) for k in range(epoch_batches)]
        if session.info is None:
            raise RuntimeError("the session is not open")  # unreachable: the caller opened it
        self._stream = BatchStream(session, items, session.info.prefetch)
        return self._stream

    def epoch_finished(self, epoch: int, epoch_batches: int) -> None:
        """The consumer took the last batch of ``epoch``: plan ``epoch + 2`` once ``epoch + 1`` is the
        last one planned, so one whole epoch stays ahead of it."""
        stream = self._stream
        if stream is not None and stream.last_item is not None and stream.last_item[0] == epoch + 1:
            stream.extend([(epoch + 2, k) for k in range(epoch_batches)])

    def drop(self) -> None:
        """Abandon the stream (its requests' answers will be dropped); the next :meth:`stream` starts anew."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def forget(self) -> None:
        """Let go of the stream without touching it (a forked copy must not use its parent's)."""
        self._stream = None

    def __getstate__(self) -> dict[str, Any]:
        # A copy for another process (DataLoader workers) starts without a stream.
        return {**self.__dict__, "_stream": None}
