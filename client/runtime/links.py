"""One link per loader server: a DEALER socket plus what the client has learnt about that server."""

from __future__ import annotations

import logging
from typing import Any

import zmq

from stoker.client.protocol.wire import Kind, encode

__all__ = ["ServerLink"]

log = logging.getLogger(__name__)


class ServerLink:
    """A connection to one server. ``usable`` once it answered ``HELLO`` with the expected dataset."""

    def __init__(self, context: zmq.Context, endpoint: str, heartbeat_ms: int = 1000) -> None:
        self.endpoint = endpoint
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        # Queue nothing for a server that is not connected: a failed send tells us to go elsewhere.
        self.socket.setsockopt(zmq.IMMEDIATE, 1)
        self.socket.setsockopt(zmq.RECONNECT_IVL, 100)
        self.socket.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, heartbeat_ms * 5)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.setsockopt(zmq.IPV6, 1)  # tcp://[::1]:5555 and dual-stack names
        self.socket.connect(endpoint)
        self.usable = False
        self.hello_sent_at = 0.0
        self.avoid_until = 0.0
        """While draining or failing, the link gets no new requests until this time."""
        self.latency_s = 0.05
        """Smoothed seconds from request to batch: the weight for spreading requests."""
        self.outstanding = 0
        self.received = 0

    def send(self, kind: Kind, fields: dict[str, Any]) -> bool:
        """Send a header-only message; ``False`` if the server is not connected right now."""
        try:
            self.socket.send(encode(kind, fields), zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def observe_latency(self, seconds: float) -> None:
        """Fold one request's latency into the estimate."""
        self.latency_s = 0.8 * self.latency_s + 0.2 * seconds
        self.received += 1

    def cost(self) -> float:
        """Expected wait for one more request here: lower is better."""
        return (self.outstanding + 1) * self.latency_s

    def available(self, now: float) -> bool:
        """May get new requests now."""
        return self.usable and now >= self.avoid_until

    def close(self) -> None:
        """Close the socket, dropping anything unsent."""
        self.socket.close(linger=0)

    def __repr__(self) -> str:
        return f"ServerLink({self.endpoint!r}, usable={self.usable})"
