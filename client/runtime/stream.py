"""The batch stream: fetch batches ``(epoch, k)`` over a :class:`Session`, in order, by credit.

A :class:`BatchStream` walks a list of batches, running ahead into the next epoch. It keeps at most
``prefetch`` of them requested or received-but-unconsumed (its requests are its credits, so the
server never holds more than that for us), spreads requests over usable servers by expected wait,
re-asks (another server when there is one) when a request goes unanswered, and hands batches back
strictly in order. Because batch bytes depend only on ``(job, epoch, rank, k)``, a re-ask can never
produce a different or duplicated batch: late duplicates are simply dropped.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stoker.client.protocol.errors import StokerTimeoutError
from stoker.client.protocol.wire import ErrorCode
from stoker.client.runtime.links import ServerLink
from stoker.client.runtime.replies import MAX_INTERNAL_RETRIES, is_transient, server_error
from stoker.client.runtime.session import RawBatch, Session

__all__ = ["BatchStream", "Item"]

log = logging.getLogger(__name__)

Item = tuple[int, int]
"""``(epoch, k)``: one batch of this rank."""


@dataclass(slots=True)
class _Request:
    link: ServerLink
    sent_at: float
    tries: int = 1


class BatchStream:
    """Fetch batches ``(epoch, k)`` in the order given, keeping up to ``prefetch`` of them in flight.

    The order may run past the current epoch into the next one, so a training loop sees no bubble at
    epoch boundaries; :meth:`extend` adds items as the consumer gets close to the end.
    """

    def __init__(self, session: Session, items: Sequence[Item], prefetch: int) -> None:
        self.session = session
        self.prefetch = prefetch
        self._todo: deque[Item] = deque(items)
        self._unsent: deque[Item] = deque()
        self._outstanding: dict[Item, _Request] = {}
        self._ready: dict[Item, RawBatch] = {}
        # Per item, not per request: a retry is a new request, and the count must survive it.
        self._internal_errors: dict[Item, int] = {}
        self._failure: BaseException | None = None
        self._hold_until = 0.0
        self.next_item: Item | None = self._todo[0] if self._todo else None
        """The item the consumer will ask for next."""
        self.last_item: Item | None = self._todo[-1] if self._todo else None

    def extend(self, items: Sequence[Item]) -> None:
        """Plan more items after the last one."""
        self._todo.extend(items)
        if items:
            self.last_item = items[-1]
            if self.next_item is None:
                self.next_item = self._upcoming()

    def get(self, item: Item) -> RawBatch:
        """Batch ``item``; waits, re-asks and raises :class:`StokerTimeoutError` after ``timeout_s`` of silence."""
        if item != self.next_item:
            raise RuntimeError(f"asked for {item}, the stream is at {self.next_item}")
        session = self.session
        timeout_s = session.timeout_s
        deadline = time.monotonic() + timeout_s
        while item not in self._ready:
            if self._failure is not None:
                raise self._failure
            now = time.monotonic()
            if now >= deadline:
                waiting = sorted(self._outstanding) or [item]
                raise StokerTimeoutError(
                    f"no batch from {[link.endpoint for link in session.links]} within timeout_s={timeout_s} "
                    f"(waiting for (epoch, batch) {waiting[:8]})"
                )
            for link in session.refresh(now):
                self._on_link_removed(link)
            session.greet(now)
            self._send_requests(now)
            arrivals = session.poll(min(0.05, deadline - now), self._wants)
            for link, batch in arrivals.batches:
                self._on_batch(link, batch)
            for link, fields in arrivals.errors:
                self._on_error(link, fields)
            if arrivals.batches:
                deadline = time.monotonic() + timeout_s
        batch = self._ready.pop(item)
        self.next_item = self._upcoming()
        self._send_requests(time.monotonic())
        return batch

    def close(self) -> None:
        """Stop: outstanding requests are abandoned (their replies will be dropped)."""
        for request in self._outstanding.values():
            request.link.outstanding -= 1
        self._outstanding.clear()
        self._ready.clear()

    # -- what arrives ----------------------------------------------------------------------------

    def _wants(self, epoch: int, k: int) -> bool:
        return (epoch, k) in self._outstanding

    def _on_batch(self, link: ServerLink, batch: RawBatch) -> None:
        item = (batch.epoch, batch.k)
        request = self._outstanding.pop(item)
        request.link.outstanding -= 1
        if request.link is link:
            link.observe_latency(time.monotonic() - request.sent_at)
        self._internal_errors.pop(item, None)
        self._ready[item] = batch

    def _on_error(self, link: ServerLink, fields: dict[str, Any]) -> None:
        item = (fields.get("epoch", -1), fields["k"])
        code = fields["code"]
        if not is_transient(code):  # raised by get(), and again by every later get()
            self._failure = server_error(fields, link.endpoint)
            return
        if item not in self._outstanding:
            return  # a late answer to a request asked again since
        if code in (ErrorCode.INTERNAL, ErrorCode.STORAGE_UNAVAILABLE):
            failures = self._internal_errors.get(item, 0) + 1
            self._internal_errors[item] = failures
            if failures > MAX_INTERNAL_RETRIES:
                self._failure = server_error(fields, link.endpoint)
                self._failure.add_note(f"asked {failures} times; every answer was {ErrorCode(code).name}")
                return
            log.debug("batch %s failed on %s (%s); asking again", item, link.endpoint, fields["message"])
            if code == ErrorCode.STORAGE_UNAVAILABLE:
                link.avoid_until = time.monotonic() + 0.5 * failures  # give the store a moment
        elif code == ErrorCode.SHUTTING_DOWN:
            link.avoid_until = time.monotonic() + 2.0
        elif code == ErrorCode.NOT_READY:
            link.avoid_until = time.monotonic() + 0.5  # still listing its datasets: ask again soon
        elif code == ErrorCode.BUSY:
            self.prefetch = max(1, min(self.prefetch, fields.get("prefetch", self.prefetch)))
            self._hold_until = time.monotonic() + fields.get("retry_after_s", 0.05)
        self._forget(item)
        self._unsent.appendleft(item)

    def _on_link_removed(self, link: ServerLink) -> None:
        """A server left: what it owed us is asked of the others at once."""
        owed = sorted(item for item, request in self._outstanding.items() if request.link is link)
        for item in owed:
            del self._outstanding[item]
        self._unsent.extendleft(reversed(owed))

    # -- what is sent ----------------------------------------------------------------------------

    def _upcoming(self) -> Item | None:
        pending = [*self._ready, *self._outstanding, *self._unsent]
        if pending:
            return min(pending)
        return self._todo[0] if self._todo else None

    def _forget(self, item: Item) -> None:
        request = self._outstanding.pop(item, None)
        if request is not None:
            request.link.outstanding -= 1

    def _retry_after_s(self) -> float:
        slowest = max((link.latency_s for link in self.session.links if link.usable), default=0.05)
        return min(max(0.5, 4.0 * slowest), max(0.5, self.session.timeout_s / 3))

    def _send_requests(self, now: float) -> None:
        # Re-ask requests that went unanswered for too long, preferring another server.
        retry_after = self._retry_after_s()
        for item, request in list(self._outstanding.items()):
            if now - request.sent_at >= retry_after:
                link = self._pick(now, avoid=request.link)
                if link is not None and self.session.request(link, *item):
                    request.link.outstanding -= 1
                    link.outstanding += 1
                    request.link, request.sent_at = link, now
                    request.tries += 1
                    log.debug("re-asked batch %s (try %d) from %s", item, request.tries, link.endpoint)
        if now < self._hold_until:
            return
        while self._unsent or self._todo:
            queue = self._unsent if self._unsent else self._todo
            item = queue[0]
            if not self._has_credit(item):
                return
            link = self._pick(now)
            if link is None or not self.session.request(link, *item):
                if link is not None:
                    link.avoid_until = now + 0.05  # not connected right now
                return
            queue.popleft()
            link.outstanding += 1
            self._outstanding[item] = _Request(link, now)

    def _has_credit(self, item: Item) -> bool:
        if len(self._outstanding) >= self.prefetch:
            return False
        # Received batches wait only for the consumer: after BUSY shrank the window, they must not
        # keep the batch it waits for from being asked again.
        return len(self._outstanding) + len(self._ready) < self.prefetch or item == self.next_item

    def _pick(self, now: float, avoid: ServerLink | None = None) -> ServerLink | None:
        links = [link for link in self.session.links if link.available(now)]
        if not links:
            return None
        others = [link for link in links if link is not avoid]
        return min(others or links, key=lambda link: link.cost())
