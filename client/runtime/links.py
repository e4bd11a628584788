"""One link per loader server: a DEALER socket plus what the client has learnt about that server."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import zmq
from zmq.utils.monitor import recv_monitor_message

from stoker.client.protocol.errors import AuthenticationError
from stoker.client.protocol.wire import Kind, encode

__all__ = ["ClientKeys", "ServerLink"]

log = logging.getLogger(__name__)

_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
# A handshake cut short without a reason is what a wrong server key looks like from here (the server
# cannot open our first box and hangs up); one could also be a connection lost at that moment.
_SILENT_FAILURES_TO_GIVE_UP = 2


class ClientKeys(NamedTuple):
    """The CURVE keys of a client: the server's public key and the client's own pair (Z85 text)."""

    server: bytes
    public: bytes
    secret: bytes


class ServerLink:
    """A connection to one server. ``usable`` once it answered ``HELLO`` with the expected dataset."""

    def __init__(
        self, context: zmq.Context, endpoint: str, heartbeat_ms: int = 1000, keys: ClientKeys | None = None
    ) -> None:
        self.endpoint = endpoint
        self.keys = keys
        self.socket = context.socket(zmq.DEALER)
        if keys is not None:  # before connect: the handshake authenticates both sides and encrypts
            self.socket.curve_serverkey = keys.server
            self.socket.curve_publickey = keys.public
            self.socket.curve_secretkey = keys.secret
        # The handshake's outcome, so a refusal is an AuthenticationError now, not a timeout later.
        self.monitor = self.socket.get_monitor_socket(_HANDSHAKE_EVENTS)
        self._silent_failures = 0
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

    def check_handshakes(self) -> None:
        """Read the socket's handshake events; raise :class:`AuthenticationError` on a refusal."""
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._silent_failures = 0
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise AuthenticationError(
                    f"server {self.endpoint} refused this client's key (ZAP status {value}): it is not among "
                    "the server's authorised clients",
                    self.endpoint,
                )
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                raise AuthenticationError(self._protocol_failure(value), self.endpoint)
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                self._silent_failures += 1
                if self._silent_failures >= _SILENT_FAILURES_TO_GIVE_UP:
                    if self.keys is None:  # a plain client's handshake only fails against a secured server
                        raise AuthenticationError(self._protocol_failure(value), self.endpoint)
                    raise AuthenticationError(
                        f"server {self.endpoint} hung up during the CURVE handshake {self._silent_failures} times: "
                        "server_key is probably not this server's public key",
                        self.endpoint,
                    )

    def _protocol_failure(self, code: int) -> str:
        if self.keys is None:
            return (
                f"server {self.endpoint} requires CURVE keys: pass server_key= and client_key= "
                "(or set STOKER_SERVER_KEY and STOKER_CLIENT_KEY_FILE)"
            )
        return (
            f"CURVE handshake with {self.endpoint} failed (ZMTP error {code:#x}): the server runs without "
            "keys, or server_key is not its public key"
        )

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
        self.socket.disable_monitor()
        self.monitor.close(linger=0)
        self.socket.close(linger=0)

    def __repr__(self) -> str:
        return f"ServerLink({self.endpoint!r}, usable={self.usable})"
