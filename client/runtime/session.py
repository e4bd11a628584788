"""A session: links to every loader server for one job, and the frames that come back from them.

The session opens the job on each server (``HELLO`` -> ``JOB_INFO``), keeps the set of servers in
step with DNS, sends requests, and reads and checks every frame. It does not know which batches are
wanted: :meth:`Session.poll` asks its caller's predicate and returns what arrived, and
:meth:`Session.refresh` returns the servers that went away, so the caller (a
:class:`~stoker.client.runtime.stream.BatchStream`) decides what to do about both.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from stoker.client.protocol.errors import ProtocolError, StokerTimeoutError
from stoker.client.protocol.job import JobSpec
from stoker.client.protocol.wire import Header, Kind, batch_nbytes, decode, decode_targets
from stoker.client.runtime.endpoints import parse_endpoints
from stoker.client.runtime.framing import discard_rest, receive_payload
from stoker.client.runtime.links import ClientKeys, ServerLink
from stoker.client.runtime.replies import is_transient, server_error

__all__ = ["Arrivals", "JobInfo", "RawBatch", "Session", "Wants"]

log = logging.getLogger(__name__)

Wants = Callable[[int, int], bool]
"""``wants(epoch, k)``: whether the caller still waits for that batch (else it is read and dropped)."""


def _image_shape(view: list[int], layout: str) -> tuple[int, ...]:
    """One image's ``(H, W, 3)`` from a ``BATCH`` view shape in the job's layout."""
    return (view[2], view[3], view[1]) if layout == "nchw" and len(view) == 4 else tuple(view[1:])


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
    views: tuple[tuple[int, int, int], ...] | None = None
    """``(H, W, 3)`` per view for a multi-view pipeline (the client then yields a list of tensors)."""
    mixture: dict[str, Any] | None = None
    """A mixture's sources, sizes, base weights and ``epoch_samples`` (``None`` for a dataset)."""
    targets: dict[str, str] | None = None
    """The job's targets, field -> kind, when it asked for any."""

    @property
    def shapes(self) -> tuple[tuple[int, int, int], ...]:
        """The image shape of every view (one entry for a single-view pipeline)."""
        return self.views if self.views is not None else (self.image_shape,)


@dataclass(slots=True)
class RawBatch:
    """A received batch: its header fields and its image bytes (a zmq frame or a caller's buffer)."""

    epoch: int
    k: int
    fields: dict[str, Any]
    data: Any
    endpoint: str
    mask: Any = None
    """The mask block's frame (``B x H x W`` ``uint8``), when the job carries a mask."""
    targets: dict[str, list[Any]] | None = None
    """The targets frame, parsed: field -> one value per sample."""


@dataclass(slots=True)
class Arrivals:
    """What one :meth:`Session.poll` received: wanted batches, and ``ERROR`` replies to requests."""

    batches: list[tuple[ServerLink, RawBatch]] = field(default_factory=list)
    errors: list[tuple[ServerLink, dict[str, Any]]] = field(default_factory=list)

    def has_batch(self, epoch: int, k: int) -> bool:
        """Whether batch ``(epoch, k)`` is already among :attr:`batches`."""
        return any(batch.epoch == epoch and batch.k == k for _, batch in self.batches)


def _nothing(epoch: int, k: int) -> bool:
    return False


class Session:
    """Links to every server for one job; :meth:`open` waits for the job info. Close it when done."""

    def __init__(
        self,
        endpoints: Sequence[str],
        spec: JobSpec,
        rank: int,
        prefetch: int,
        timeout_s: float,
        *,
        progress: Callable[[], dict[str, float]] = dict,
        receive_into: Callable[[int], tuple[memoryview, Any]] | None = None,
        client_id: str | None = None,
        resolve_interval_s: float = 10.0,
        join_grace_s: float = 1.0,
        keys: ClientKeys | None = None,
    ) -> None:
        """``progress`` gives the figures (waited_s, elapsed_s) sent with every request, for the
        server's stall-share view. ``receive_into(n)`` gives a writable view to receive a batch of
        ``n`` bytes into and the object that owns it (a pinned tensor); ``None`` keeps ZeroMQ's frame.
        ``dns+tcp://`` endpoints are resolved again every ``resolve_interval_s``; after the first
        server describes the job, :meth:`open` waits up to ``join_grace_s`` for the others. ``keys``
        turns on CURVE for every server of the job (the same keys serve every endpoint)."""
        self.endpoints = list(endpoints)
        self.spec = spec
        self.rank = rank
        self.prefetch = prefetch
        self.timeout_s = timeout_s
        self.client_id = client_id or uuid.uuid4().hex[:16]
        self.info: JobInfo | None = None
        self._progress = progress
        self._receive_into = receive_into
        self._resolve_interval_s = resolve_interval_s
        self._join_grace_s = join_grace_s
        self._keys = keys
        self._sources = parse_endpoints(self.endpoints)
        self._job_wire = spec.to_wire()
        # Epochs resumed on another number of ranks are asked for as their re-planned job (with a span).
        self._resumed: dict[int, tuple[str, dict[str, Any]]] = {}
        self._links: dict[str, ServerLink] = {}
        self._by_socket: dict[zmq.Socket, ServerLink] = {}
        self._by_monitor: dict[zmq.Socket, ServerLink] = {}
        self._resolved: dict[str, list[str]] = {}
        self._resolved_at = float("-inf")
        self._closed = False
        self._context = zmq.Context()
        self._poller = zmq.Poller()
        try:
            self.refresh(time.monotonic())
        except BaseException:
            self.close()
            raise

    @property
    def links(self) -> list[ServerLink]:
        """The servers currently known."""
        return list(self._links.values())

    def refresh(self, now: float) -> list[ServerLink]:
        """Resolve ``dns+tcp://`` endpoints when due; connect to new servers, drop vanished ones.

        Returns the links dropped (already closed): whatever was asked of them must be asked elsewhere.
        """
        if now - self._resolved_at < self._resolve_interval_s:
            return []
        self._resolved_at = now
        for source in self._sources:
            try:
                self._resolved[source.raw] = source.resolve()
            except OSError as exc:  # keep what we had: DNS hiccups must not drop healthy servers
                log.warning("cannot resolve %s: %s", source.raw, exc)
        wanted = {endpoint for endpoints in self._resolved.values() for endpoint in endpoints}
        for endpoint in sorted(wanted - self._links.keys()):
            link = ServerLink(self._context, endpoint, keys=self._keys)
            self._links[endpoint] = link
            self._by_socket[link.socket] = link
            self._by_monitor[link.monitor] = link
            self._poller.register(link.socket, zmq.POLLIN)
            self._poller.register(link.monitor, zmq.POLLIN)
            log.info("server %s added", endpoint)
        removed = []
        for endpoint in sorted(self._links.keys() - wanted):
            link = self._links.pop(endpoint)
            self._poller.unregister(link.socket)
            self._poller.unregister(link.monitor)
            del self._by_socket[link.socket]
            del self._by_monitor[link.monitor]
            link.close()
            removed.append(link)
            log.info("server %s removed (no longer in DNS)", endpoint)
        return removed

    def resume(self, epoch: int, spec: JobSpec) -> None:
        """Ask for ``epoch``'s batches as ``spec`` (the job's re-plan of what is left of that epoch)."""
        self._resumed = {epoch: (spec.job_id, spec.to_wire())}

    def _job_for(self, epoch: int) -> tuple[str | None, dict[str, Any]]:
        resumed = self._resumed.get(epoch)
        if resumed is not None:
            return resumed
        return (self.info.job_id if self.info else None), self._job_wire

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
                    f"no stoker server answered within timeout_s={self.timeout_s}: tried {self.endpoints}"
                )
            self.greet(now)
            self.poll(min(0.1, deadline - now))
        # Give the other servers a moment to answer too, so the first requests spread over all of
        # them instead of piling onto whichever connected first. Late ones join whenever they answer.
        settle_by = min(deadline, time.monotonic() + self._join_grace_s)
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
            tuple(tuple(view) for view in fields["views"]) if "views" in fields else None,  # type: ignore[misc]
            fields.get("mixture"),
            dict(fields["targets"]) if "targets" in fields else None,
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

    def poll(self, timeout_s: float, wants: Wants = _nothing) -> Arrivals:
        """Wait up to ``timeout_s`` for messages and read them all.

        Returns the batches ``wants`` accepted and the ``ERROR`` replies to requests. Job info is
        taken in; an ``ERROR`` about the session itself (a refused ``HELLO``) is raised as a typed
        exception unless it is transient; a malformed frame is a :class:`ProtocolError`.
        """
        arrivals = Arrivals()
        for socket, _ in self._poller.poll(max(0, int(timeout_s * 1000))):
            link = self._by_socket.get(socket)
            if link is not None:
                self._read(link, wants, arrivals)
            elif (watched := self._by_monitor.get(socket)) is not None:
                watched.check_handshakes()  # raises AuthenticationError on a refusal
        return arrivals

    def _read(self, link: ServerLink, wants: Wants, arrivals: Arrivals) -> None:
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
                discard_rest(socket, more)
                raise ProtocolError(f"server {link.endpoint} sent a malformed message: {exc}", exc.code) from None
            if header.kind == Kind.BATCH:
                self._on_batch(link, header, more, wants, arrivals)
                continue
            discard_rest(socket, more)
            if header.kind == Kind.JOB_INFO:
                self._on_job_info(link, header.fields)
            elif header.kind == Kind.ERROR and "k" in header.fields:
                arrivals.errors.append((link, header.fields))
            elif header.kind == Kind.ERROR:
                if not is_transient(header.fields["code"]):
                    raise server_error(header.fields, link.endpoint)
                # e.g. HELLO refused by a draining server: the next greeting or another server answers
                log.debug("server %s: %s", link.endpoint, header.fields["message"])
            else:
                raise ProtocolError(f"server {link.endpoint} sent an unexpected {header.kind.name}")

    def _on_batch(self, link: ServerLink, header: Header, more: int, wants: Wants, arrivals: Arrivals) -> None:
        fields = header.fields
        shape = fields["shape"]
        info = self.info
        shapes = fields.get("views", [shape])
        if (
            not more
            or fields["dtype"] != "uint8"
            or any(len(view) != 4 or view[0] != shape[0] for view in shapes)
            or (info is not None and tuple(_image_shape(view, self.spec.layout) for view in shapes) != info.shapes)
            or not 0 < shape[0] <= self.spec.batch_size
            or len(fields["labels"]) != shape[0]
            or len(fields["indices"]) != shape[0]
        ):
            discard_rest(link.socket, more)
            raise ProtocolError(f"server {link.endpoint} sent an inconsistent BATCH header {shapes}")
        epoch, k = fields["epoch"], fields["k"]
        ours = info is not None and fields["job_id"] == self._job_for(epoch)[0] and fields["rank"] == self.rank
        if not ours or not wants(epoch, k) or arrivals.has_batch(epoch, k):
            discard_rest(link.socket, more)  # e.g. a late duplicate of a batch that was asked again
            return
        nbytes = sum(batch_nbytes(view) for view in shapes)
        tail = "targets" in fields
        data, received = receive_payload(link.socket, nbytes, self._receive_into, tail)
        if received != nbytes:
            discard_rest(link.socket, link.socket.getsockopt(zmq.RCVMORE) if tail else 0)
            raise ProtocolError(f"server {link.endpoint} sent {received} image bytes for shapes {shapes}")
        batch = RawBatch(epoch, k, fields, data, link.endpoint)
        if tail:
            self._receive_targets(link, batch, shape[0])
        arrivals.batches.append((link, batch))

    def _receive_targets(self, link: ServerLink, batch: RawBatch, rows: int) -> None:
        """The frames after the images: the mask block (when the header has ``mask``), then the targets."""
        socket, fields = link.socket, batch.fields
        frames = []
        while socket.getsockopt(zmq.RCVMORE) and len(frames) < 3:
            frames.append(socket.recv(copy=False))
        discard_rest(socket, socket.getsockopt(zmq.RCVMORE))
        mask = fields.get("mask")
        expected = 2 if mask is not None else 1
        if len(frames) != expected or (
            mask is not None and (len(mask) != 3 or mask[0] != rows or len(frames[0].buffer) != batch_nbytes(mask))
        ):
            raise ProtocolError(f"server {link.endpoint} sent a BATCH whose target frames do not match its header")
        if mask is not None:
            batch.mask = frames[0]
        batch.targets = decode_targets(frames[-1].buffer, rows)

    # -- sending ---------------------------------------------------------------------------------

    def request(self, link: ServerLink, epoch: int, k: int) -> bool:
        """Ask ``link`` for batch ``k`` of ``epoch``; ``False`` if it is not connected."""
        info = self.info
        fields = {
            "job": self._job_for(epoch)[1],
            "epoch": epoch,
            "rank": self.rank,
            "k": k,
            "client": self.client_id,
            **({"fingerprint": info.fingerprint} if info else {}),
            **self._progress(),
        }
        return link.send(Kind.REQUEST, fields)

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Tell the servers we are leaving, then close every socket. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for link in self._links.values():
            link.send(Kind.BYE, {"client": self.client_id})
            link.close()
        self._links.clear()
        self._by_socket.clear()
        self._by_monitor.clear()
        self._context.term()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
