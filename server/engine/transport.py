"""The data socket: a ZeroMQ ROUTER that receives client headers and sends batches without copying.

Batches leave straight from their shared-memory slot (``copy=False``); a ``MessageTracker`` says when
ZeroMQ has handed the bytes to the kernel and the slot may be reused. Peers that send oversized
frames are disconnected by ZeroMQ itself (``MAXMSGSIZE``); peers that vanish are detected by ZMTP
heartbeats, which drops whatever was queued for them.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from stoker.client.protocol.wire import MAX_HEADER_BYTES, Kind, encode, payload_parts

__all__ = ["Incoming", "Transport", "DataPlane"]

log = logging.getLogger(__name__)


def _wants_ipv6(bind: str) -> bool:
    # Not for an IPv4 literal: the bound endpoint would read tcp://[::ffff:127.0.0.1]:PORT.
    if not bind.startswith("tcp://"):
        return False
    host = bind[len("tcp://") :].rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return True  # "*" or a host name: listen on both families


@dataclass(frozen=True, slots=True)
class Incoming:
    """A message from a client: its routing identity and its frames (header first)."""

    identity: bytes
    frames: list[bytes]


class Transport:
    """The ROUTER socket bound to ``bind``; ``endpoint`` is where it actually listens."""

    def __init__(
        self,
        context: zmq.Context,
        bind: str,
        heartbeat_ms: int,
        secure: Callable[[zmq.Socket], None] | None = None,
    ) -> None:
        """``secure`` configures the socket's security (CURVE) before it binds."""
        self.socket = context.socket(zmq.ROUTER)
        if secure is not None:
            secure(self.socket)
        # Unknown or vanished peers raise EHOSTUNREACH instead of silently swallowing a batch.
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # Flow control is the client's credit window (its requests), capped by the engine; a
        # message-count HWM would only make sends fail at arbitrary points.
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_HEADER_BYTES)
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, heartbeat_ms * 5)
        self.socket.setsockopt(zmq.LINGER, 0)
        if _wants_ipv6(bind):  # tcp://*:5555 then accepts IPv4 and IPv6 clients
            self.socket.setsockopt(zmq.IPV6, 1)
        self.socket.bind(bind)
        self.endpoint: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("data socket bound to %s%s", self.endpoint, " (CURVE)" if secure is not None else "")

    def receive(self, limit: int = 256) -> Iterator[Incoming]:
        """Up to ``limit`` waiting messages, without blocking."""
        for _ in range(limit):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            yield Incoming(frames[0], frames[1:])

    def send(self, identity: bytes, kind: Kind, fields: dict[str, Any]) -> bool:
        """Send a header-only message; ``False`` when the peer is gone."""
        try:
            self.socket.send_multipart([identity, encode(kind, fields)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            log.debug("dropping %s to a gone peer: %s", kind.name, exc)
            return False

    def send_batch(
        self, identity: bytes, header: bytes, payload: memoryview, sample_bytes: int, tail: Sequence[Any] = ()
    ) -> zmq.MessageTracker | None:
        """Send a batch from ``payload`` without copying, then the ``tail`` frames (a mask block, the
        targets frame); ``None`` when the peer is gone.

        The tracker is the last frame's: ZeroMQ writes frames in order, so when it is done all are.
        """
        parts = [payload[offset : offset + length] for offset, length in payload_parts(len(payload), sample_bytes)]
        frames: list[Any] = [identity, header, *parts, *tail]
        if tail:
            # The tracker is the last frame's; a small one (the targets frame) would be copied and
            # report done at once while the slot's frames are still queued: track it without copying.
            frames[-1] = zmq.Frame(frames[-1], copy=False, track=True)
        try:
            return self.socket.send_multipart(frames, zmq.NOBLOCK, copy=False, track=True)
        except zmq.ZMQError as exc:
            log.debug("dropping a batch to a gone peer: %s", exc)
            return None

    def close(self) -> None:
        """Close the socket, dropping anything unsent."""
        self.socket.close(linger=0)


class DataPlane:
    """The data plane's sockets, opened and closed together: a ZeroMQ context, the ROUTER
    :class:`Transport`, and CURVE on it (:class:`~stoker.server.engine.access.DataAccess`, its
    handshake monitor included) when the server has keys."""

    def __init__(self, bind: str, heartbeat_ms: int, secret_key_file: str | None, authorized_clients: str | None):
        from stoker.server.engine.access import DataAccess

        self.context = zmq.Context()
        self.access: DataAccess | None = None
        if secret_key_file and authorized_clients:
            self.access = DataAccess(secret_key_file, authorized_clients)
            self.access.start(self.context)
        secure = self.access.secure if self.access is not None else None
        self.transport = Transport(self.context, bind, heartbeat_ms, secure=secure)

    def poller(self, *fds: int) -> zmq.Poller:
        """A poller on the data socket, the handshake monitor and ``fds``."""
        poller = zmq.Poller()
        poller.register(self.transport.socket, zmq.POLLIN)
        if self.access is not None and self.access.monitor is not None:
            poller.register(self.access.monitor, zmq.POLLIN)
        for fd in fds:
            poller.register(fd, zmq.POLLIN)
        return poller

    def on_events(self, events: dict[Any, int]) -> Iterator[Incoming]:
        """What a poll found on these sockets: handshake events are handled, messages yielded."""
        if self.access is not None and self.access.monitor is not None and self.access.monitor in events:
            self.access.on_events()
        if self.transport.socket in events:
            yield from self.transport.receive()

    def close(self) -> None:
        """Close the sockets (dropping what is unsent) and end the context."""
        if self.access is not None:
            self.access.close(self.transport.socket)
        self.transport.close()
        self.context.term()
