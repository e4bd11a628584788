"""The client's protocol engine: open the job on every server, then fetch batches by credit.

A :class:`Session` owns one :class:`ServerLink` per server. A :class:`BatchStream` walks a list of
batches ``(epoch, k)``, running ahead into the next epoch. It keeps at most ``prefetch`` of them
requested or received-but-unconsumed (its requests are its credits, so the server never holds more
than that for us), spreads requests over usable servers by expected wait, re-asks (another server
when there is one) when a request goes unanswered, and hands batches back strictly in order. Because
batch bytes depend only on ``(job, epoch, rank, k)``, a re-ask can never produce a different or
duplicated batch: late duplicates are simply dropped.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from stoker.client.protocol.errors import (
    BadSampleError,
    InvalidJobError,
    ProtocolError,
    ServerError,
    StokerTimeoutError,
    UnknownDatasetError,
)
from stoker.client.protocol.job import JobSpec
from stoker.client.protocol.wire import MAX_PART_BYTES, ErrorCode, Header, Kind, batch_nbytes, decode
from stoker.client.runtime.endpoints import parse_endpoints
from stoker.client.runtime.links import ServerLink

__all__ = ["JobInfo", "RawBatch", "Session", "BatchStream", "Item"]

log = logging.getLogger(__name__)

_TRANSIENT = {ErrorCode.BUSY, ErrorCode.SHUTTING_DOWN, ErrorCode.INTERNAL}
_MAX_INTERNAL_RETRIES = 3


@dataclass(frozen=True, slots=True)
class JobInfo:
    """What the servers said about the job."""

    job_id: str
    samples: int
    classes: tuple[str, ...]
    batches: int
    image_shape: tuple[int, int, int]
    fingerprint: str
    prefetch: int


@dataclass(slots=True)
class RawBatch:
    """A received batch: its header fields and its image bytes (a zmq frame or a caller's buffer)."""

    k: int
    fields: dict[str, Any]
    data: Any
    endpoint: str


@dataclass(slots=True)
class _Request:
    link: ServerLink
    sent_at: float
    tries: int = 1
    internal_errors: int = 0


def server_error(fields: dict[str, Any], endpoint: str) -> ServerError | ProtocolError:
    """The typed exception for an ``ERROR`` message."""
    code, message = fields["code"], fields["message"]
    if code in (ErrorCode.UNKNOWN_DATASET, ErrorCode.UNKNOWN_PIPELINE):
        return UnknownDatasetError(message, code, endpoint)
    if code in (ErrorCode.INVALID_JOB, ErrorCode.OUT_OF_RANGE, ErrorCode.DATASET_CHANGED):
        return InvalidJobError(message, code, endpoint)
    if code == ErrorCode.BAD_SAMPLE:
        return BadSampleError(message, code, endpoint, fields.get("path", ""), fields.get("reason", ""))
    if code in (ErrorCode.BAD_MESSAGE, ErrorCode.UNSUPPORTED_VERSION):
        error = ProtocolError(f"server refused our message: {message}", code)
        error.add_note(f"reported by stoker server {endpoint}")
        return error
    return ServerError(message, code, endpoint)


@dataclass
class Session:
    """Links to every server for one job; :meth:`open` waits for the job info."""

    endpoints: Sequence[str]
    spec: JobSpec
    rank: int
    prefetch: int
    timeout_s: float
    progress: Callable[[], dict[str, float]] = dict
    """Figures (waited_s, elapsed_s) sent with every request, for the server's stall-share view."""
    receive_into: Callable[[int], tuple[memoryview, Any]] | None = None
    """For a batch of ``n`` bytes: a writable view to receive into and the object that owns it (a
    pinned tensor); ``None`` keeps ZeroMQ's frame."""
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    resolve_interval_s: float = 10.0
    """How often ``dns+tcp://`` endpoints are resolved again."""
    join_grace_s: float = 1.0
    """After the first server describes the job, how long :meth:`open` waits for the others."""

    def __post_init__(self) -> None:
        self.sources = parse_endpoints(list(self.endpoints))
        self.context = zmq.Context()
        self.poller = zmq.Poller()
        self._links: dict[str, ServerLink] = {}
        self._by_socket: dict[zmq.Socket, ServerLink] = {}
        self._resolved: dict[str, list[str]] = {}
        self._resolved_at = float("-inf")
        self.info: JobInfo | None = None
        self.current: BatchStream | None = None
        self._job_wire = self.spec.to_wire()
        self.refresh(time.monotonic())

    @property
    def links(self) -> list[ServerLink]:
        """The servers currently known."""
        return list(self._links.values())

    def refresh(self, now: float) -> None:
        """Resolve ``dns+tcp://`` endpoints when due; connect to new servers, drop vanished ones."""
        if now - self._resolved_at < self.resolve_interval_s:
            return
        self._resolved_at = now
        for source in self.sources:
            try:
                self._resolved[source.raw] = source.resolve()
            except OSError as exc:  # keep what we had: DNS hiccups must not drop healthy servers
                log.warning("cannot resolve %s: %s", source.raw, exc)
        wanted = {endpoint for endpoints in self._resolved.values() for endpoint in endpoints}
        for endpoint in wanted - self._links.keys():
            link = ServerLink(self.context, endpoint)
            self._links[endpoint] = link
            self._by_socket[link.socket] = link
            self.poller.register(link.socket, zmq.POLLIN)
            log.info("server %s added", endpoint)
        for endpoint in self._links.keys() - wanted:
            link = self._links.pop(endpoint)
            if self.current is not None:
                self.current.on_link_removed(link)
            self.poller.unregister(link.socket)
            del self._by_socket[link.socket]
            link.close()
            log.info("server %s removed (no longer in DNS)", endpoint)

    # -- opening ---------------------------------------------------------------------------------

    def open(self) -> JobInfo:
        """Say ``HELLO`` to every server; wait (``timeout_s``) for the first to describe the job, then
        up to ``join_grace_s`` for the rest."""
        deadline = time.monotonic() + self.timeout_s
        while self.info is None:
            now = time.monotonic()
            self.refresh(now)
            if now >= deadline:
                raise StokerTimeoutError(
                    f"no stoker server answered within timeout_s={self.timeout_s}: tried {list(self.endpoints)}"
                )
            self.greet(now)
            self.poll(min(0.1, deadline - now))
        # Give the other servers a moment to answer too, so the first requests spread over all of
        # them instead of piling onto whichever connected first. Late ones join whenever they answer.
        settle_by = min(deadline, time.monotonic() + self.join_grace_s)
        while not all(link.usable for link in self.links) and (now := time.monotonic()) < settle_by:
            self.greet(now)
            self.poll(min(0.05, settle_by - now))
        return self.info

    def greet(self, now: float) -> None:
        """(Re)send ``HELLO`` to servers that have not described the job yet."""
        for link in self.links:
            if not link.usable and now - link.hello_sent_at >= 1.0:
                fields = {"job": self._job_wire, "client": self.client_id, "rank": self.rank, "prefetch": self.prefetch}
                if link.send(Kind.HELLO, fields):
                    link.hello_sent_at = now

    def _on_job_info(self, link: ServerLink, fields: dict[str, Any]) -> None:
        info = JobInfo(
            fields["job_id"],
            fields["samples"],
            tuple(fields["classes"]),
            fields["batches"],
            tuple(fields["image_shape"]),  # type: ignore[arg-type]
            fields["fingerprint"],
            max(1, min(self.prefetch, fields["prefetch"])),
        )
        if self.info is None:
            self.info = info
        elif (info.job_id, info.fingerprint, info.batches) != (
            self.info.job_id,
            self.info.fingerprint,
            self.info.batches,
        ):
            log.warning("server %s serves a different dataset %r; not using it", link.endpoint, self.spec.dataset)
            return
        link.usable = True

    # -- receiving -------------------------------------------------------------------------------

    def poll(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for messages and handle them; ``True`` if any arrived."""
        events = self.poller.poll(max(0, int(timeout_s * 1000)))
        for socket, _ in events:
            link = self._by_socket.get(socket)
            if link is not None:
                self._read(link)
        return bool(events)

    def _read(self, link: ServerLink) -> None:
        socket = link.socket
        while True:
            try:
                frame = socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            more = socket.getsockopt(zmq.RCVMORE)
            try:
                header = decode(frame)
            except ProtocolError as exc:
                _discard_rest(socket, more)
                raise ProtocolError(f"server {link.endpoint} sent a malformed message: {exc}", exc.code) from None
            if header.kind == Kind.BATCH:
                self._on_batch(link, header, more)
                continue
            _discard_rest(socket, more)
            if header.kind == Kind.JOB_INFO:
                self._on_job_info(link, header.fields)
            elif header.kind == Kind.ERROR:
                self._on_error(link, header.fields)
            else:
                raise ProtocolError(f"server {link.endpoint} sent an unexpected {header.kind.name}")

    def _on_batch(self, link: ServerLink, header: Header, more: int) -> None:
        fields = header.fields
        shape = fields["shape"]
        expected = self.info.image_shape if self.info else None
        if (
            not more
            or fields["dtype"] != "uint8"
            or len(shape) != 4
            or (expected is not None and tuple(shape[1:]) != expected)
            or not 0 < shape[0] <= self.spec.batch_size
            or len(fields["labels"]) != shape[0]
            or len(fields["indices"]) != shape[0]
        ):
            _discard_rest(link.socket, more)
            raise ProtocolError(f"server {link.endpoint} sent an inconsistent BATCH header {shape}")
        wanted = self.current is not None and self.current.wants(fields)
        if not wanted:
            _discard_rest(link.socket, more)  # a late duplicate of a re-asked batch
            return
        nbytes = batch_nbytes(shape)
        if self.receive_into is not None:
            view, data = self.receive_into(nbytes)
            received = _receive_parts(link.socket, view, nbytes)
        elif nbytes <= MAX_PART_BYTES:
            data = link.socket.recv(copy=False)  # one frame: hand ZeroMQ's buffer over, no copy
            received = len(data.buffer) if not link.socket.getsockopt(zmq.RCVMORE) else -1
        else:
            data = np.empty(nbytes, dtype=np.uint8)  # several frames: gather them into one array
            received = _receive_parts(link.socket, memoryview(data), nbytes)
        if received != nbytes:
            _discard_rest(link.socket, link.socket.getsockopt(zmq.RCVMORE))
            raise ProtocolError(f"server {link.endpoint} sent {received} image bytes for shape {shape}")
        if self.current is not None:
            self.current.on_batch(link, RawBatch(fields["k"], fields, data, link.endpoint))

    def _on_error(self, link: ServerLink, fields: dict[str, Any]) -> None:
        if self.current is not None and self.current.on_error(link, fields):
            return
        if fields["code"] in _TRANSIENT:
            return  # e.g. HELLO refused by a draining server: another try or another server answers
        raise server_error(fields, link.endpoint)

    # -- sending ---------------------------------------------------------------------------------

    def request(self, link: ServerLink, epoch: int, k: int) -> bool:
        """Ask ``link`` for batch ``k`` of ``epoch``; ``False`` if it is not connected."""
        info = self.info
        fields = {
            "job": self._job_wire,
            "epoch": epoch,
            "rank": self.rank,
            "k": k,
            "client": self.client_id,
            **({"fingerprint": info.fingerprint} if info else {}),
            **self.progress(),
        }
        return link.send(Kind.REQUEST, fields)

    def close(self) -> None:
        """Tell the servers we are leaving, then close every socket."""
        for link in self.links:
            link.send(Kind.BYE, {"client": self.client_id})
            link.close()
        self.context.term()


def _receive_parts(socket: zmq.Socket, view: memoryview, nbytes: int) -> int:
    """Receive the image frames one after another into ``view``; return the bytes received, or -1
    when the frames overflow ``nbytes`` (the rest is discarded)."""
    offset = 0
    while True:
        size = socket.recv_into(view[offset:nbytes]) if offset < nbytes else socket.recv_into(bytearray())
        offset += size
        more = socket.getsockopt(zmq.RCVMORE)
        if offset > nbytes:
            _discard_rest(socket, more)
            return -1
        if not more:
            return offset


def _discard_rest(socket: zmq.Socket, more: int) -> None:
    while more:
        socket.recv(copy=False)
        more = socket.getsockopt(zmq.RCVMORE)


Item = tuple[int, int]
"""``(epoch, k)``: one batch of this rank."""


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
        self._failure: BaseException | None = None
        self._hold_until = 0.0
        self.next_item: Item | None = self._todo[0] if self._todo else None
        """The item the consumer will ask for next."""
        self.last_item: Item | None = self._todo[-1] if self._todo else None
        session.current = self

    def extend(self, items: Sequence[Item]) -> None:
        """Plan more items after the last one."""
        self._todo.extend(items)
        if items:
            self.last_item = items[-1]

    # -- what the session calls ------------------------------------------------------------------

    def wants(self, fields: dict[str, Any]) -> bool:
        """Whether a batch with these header fields is one this stream is waiting for."""
        info = self.session.info
        return (
            info is not None
            and fields["job_id"] == info.job_id
            and fields["rank"] == self.session.rank
            and (fields["epoch"], fields["k"]) in self._outstanding
        )

    def on_batch(self, link: ServerLink, batch: RawBatch) -> None:
        """A wanted batch arrived."""
        item = (batch.fields["epoch"], batch.k)
        request = self._outstanding.pop(item)
        request.link.outstanding -= 1
        if request.link is link:
            link.observe_latency(time.monotonic() - request.sent_at)
        self._ready[item] = batch

    def on_error(self, link: ServerLink, fields: dict[str, Any]) -> bool:
        """Handle an error about one of our requests; ``False`` if it is not about this stream."""
        item = (fields.get("epoch"), fields.get("k"))
        if item not in self._outstanding:
            return False
        code = fields["code"]
        request = self._outstanding[item]  # type: ignore[index]
        if code in _TRANSIENT:
            if code == ErrorCode.INTERNAL:
                request.internal_errors += 1
                if request.internal_errors > _MAX_INTERNAL_RETRIES:
                    self._failure = server_error(fields, link.endpoint)
                    return True
            if code == ErrorCode.SHUTTING_DOWN:
                link.avoid_until = time.monotonic() + 2.0
            if code == ErrorCode.BUSY:
                self.prefetch = max(1, min(self.prefetch, fields.get("prefetch", self.prefetch)))
                self._hold_until = time.monotonic() + fields.get("retry_after_s", 0.05)
            self._forget(item)  # type: ignore[arg-type]
            self._unsent.appendleft(item)  # type: ignore[arg-type]
            return True
        self._failure = server_error(fields, link.endpoint)
        return True

    # -- what the iterator calls -----------------------------------------------------------------

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
            session.refresh(now)
            session.greet(now)
            self._send_requests(now)
            if session.poll(min(0.05, deadline - now)) and self._ready:
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
        if self.session.current is self:
            self.session.current = None

    # -- internals -------------------------------------------------------------------------------

    def _upcoming(self) -> Item | None:
        pending = [*self._ready, *self._outstanding, *self._unsent]
        if pending:
            return min(pending)
        return self._todo[0] if self._todo else None

    def on_link_removed(self, link: ServerLink) -> None:
        """A server left: what it owed us is asked of the others at once."""
        owed = sorted(item for item, request in self._outstanding.items() if request.link is link)
        for item in owed:
            del self._outstanding[item]
        self._unsent.extendleft(reversed(owed))

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
        while (self._unsent or self._todo) and len(self._outstanding) + len(self._ready) < self.prefetch:
            queue = self._unsent if self._unsent else self._todo
            item = queue[0]
            link = self._pick(now)
            if link is None or not self.session.request(link, *item):
                if link is not None:
                    link.avoid_until = now + 0.05  # not connected right now
                return
            queue.popleft()
            link.outstanding += 1
            self._outstanding[item] = _Request(link, now)

    def _pick(self, now: float, avoid: ServerLink | None = None) -> ServerLink | None:
        links = [link for link in self.session.links if link.available(now)]
        if not links:
            return None
        others = [link for link in links if link is not avoid]
        return min(others or links, key=lambda link: link.cost())
