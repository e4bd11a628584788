"""Who may use the data socket: CURVE with the server's key pair and a folder of authorised clients.

libzmq runs the CURVE handshake; ZeroMQ's authentication protocol (ZAP) asks :meth:`DataAccess.callback`
(from pyzmq's authenticator thread) whether a client's public key may in. The folder is read again
whenever its listing changes, so keys are added and revoked without a restart and a revoked key is
refused on its next connection. A client refused at the handshake gets no message through, so
nothing (no batch, no job description, no dataset list) reaches it. Refusals are counted by reason
from the socket's handshake events and logged without key material, at most every few seconds.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from stoker.client.protocol.keys import folder_signature, load_key_pair, public_keys_in

__all__ = ["DataAccess", "REFUSAL_REASONS"]

log = logging.getLogger(__name__)

REFUSAL_REASONS = ("unknown_key", "handshake")
"""``unknown_key``: a valid CURVE client whose key is not authorised; ``handshake``: a client without
keys, or with the wrong server key (the handshake itself fails)."""

_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
_LOG_EVERY_S = 5.0

# pyzmq's authenticator logs each decision with the client's key at DEBUG: keep it out of our log.
_zap_log = logging.getLogger("stoker.server.engine.access.zap")
_zap_log.setLevel(logging.WARNING)


class DataAccess:
    """CURVE for one ROUTER socket: :meth:`start` the authenticator, :meth:`secure` the socket before
    it binds, then feed :meth:`on_events` whenever :attr:`monitor` is readable."""

    def __init__(self, secret_key_file: str, authorized_clients: str) -> None:
        self._public, self._secret = load_key_pair(secret_key_file)
        self._folder = authorized_clients
        self._lock = threading.Lock()
        self._signature: tuple[tuple[str, int, int], ...] | None = None
        self._keys: frozenset[bytes] = frozenset()
        self._authenticator: ThreadAuthenticator | None = None
        self.monitor: zmq.Socket | None = None
        self.refused = dict.fromkeys(REFUSAL_REASONS, 0)
        self._unlogged = 0
        self._logged_at = float("-inf")
        self._refresh()
        if not self._keys:
            log.warning("no authorised client keys in %s yet: every client is refused until one is added", self._folder)

    @property
    def authorised(self) -> int:
        """Client keys authorised now."""
        return len(self._keys)

    def start(self, context: zmq.Context) -> None:
        """Answer the context's ZAP requests from a background thread."""
        authenticator = ThreadAuthenticator(context, log=_zap_log)
        authenticator.start()
        authenticator.configure_curve_callback("*", self)
        self._authenticator = authenticator

    def secure(self, socket: zmq.Socket) -> None:
        """Make ``socket`` a CURVE server (call before bind) and watch its handshakes."""
        socket.curve_secretkey = self._secret
        socket.curve_publickey = self._public
        socket.curve_server = True
        self.monitor = socket.get_monitor_socket(_EVENTS)

    def callback(self, domain: str, client_key: bytes) -> bool:
        """ZAP: whether the client with public key ``client_key`` (Z85) may connect."""
        self._refresh()
        return client_key in self._keys

    def _refresh(self) -> None:
        signature = folder_signature(self._folder)
        with self._lock:
            if signature == self._signature:
                return
            keys = frozenset(public_keys_in(self._folder))
            if self._signature is not None and keys != self._keys:
                log.info(
                    "authorised clients changed: %d keys (%d added, %d removed)",
                    len(keys), len(keys - self._keys), len(self._keys - keys),
                )  # fmt: skip
            self._keys, self._signature = keys, signature

    def on_events(self) -> None:
        """Count the refusals the socket reports; log them, rate-limited."""
        if self.monitor is None:
            return
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            reason = "unknown_key" if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH else "handshake"
            self.refused[reason] += 1
            self._unlogged += 1
        now = time.monotonic()
        if self._unlogged and now - self._logged_at >= _LOG_EVERY_S:
            log.warning(
                "refused %d connection(s) at the CURVE handshake (so far: %d unknown keys, %d failed handshakes)",
                self._unlogged, self.refused["unknown_key"], self.refused["handshake"],
            )  # fmt: skip
            self._unlogged, self._logged_at = 0, now

    def close(self, socket: zmq.Socket | None) -> None:
        """Stop watching and stop the authenticator (before the context terminates)."""
        if self.monitor is not None:
            if socket is not None:
                socket.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
