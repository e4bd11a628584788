"""Admission: who is connected, and how many batches each may have in flight (flow control).

A client's requests are its credits: the engine works on at most ``window`` of them per client (the
live ``max_prefetch`` setting) and parks up to as many more (a client may ask again before a send
completes); beyond that the client is told ``BUSY``. A batch leaves the window when its send has reached the kernel.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from enum import Enum

from stoker.server.engine.records import BatchKey, Peer, PendingSend
from stoker.server.engine.requests import BatchRequest
from stoker.server.engine.stats import PeerStats

__all__ = ["Admission", "Verdict"]

log = logging.getLogger(__name__)


class Verdict(Enum):
    """What to do with a request."""

    ADMIT = "admit"
    """Work on it now."""
    DEFER = "defer"
    """The window is full: park it until a send completes."""
    BUSY = "busy"
    """The window and the parking are full: refuse it."""
    DUPLICATE = "duplicate"
    """Already admitted or parked (a client's re-ask): nothing to do."""


class Admission:
    """Every connected client's :class:`Peer` record and flow-control window."""

    def __init__(self, window: int) -> None:
        self.window = window
        """Most batches one client may have in flight (the live ``max_prefetch``): the one place it
        bounds anything."""
        self._peers: dict[bytes, Peer] = {}

    def granted(self, asked: int | None) -> int:
        """The prefetch a ``HELLO`` asking for ``asked`` batches (``None``: as many as allowed) gets."""
        return max(1, min(asked or self.window, self.window))

    # -- who is here -----------------------------------------------------------------------------

    def touch(self, identity: bytes, now: float) -> Peer:
        """The client's record (created on first contact), marked as seen ``now``."""
        peer = self._peers.get(identity)
        if peer is None:
            peer = self._peers[identity] = Peer(PeerStats(identity))
        peer.stats.last_seen = now
        return peer

    def get(self, identity: bytes) -> Peer | None:
        """The record of a connected client."""
        return self._peers.get(identity)

    def forget(self, identity: bytes) -> Peer | None:
        """Drop a client (it said ``BYE`` or went silent); return its record."""
        peer = self._peers.pop(identity, None)
        if peer is not None:
            log.info("client %s (%s) gone", peer.stats.client_id or "?", identity.hex())
        return peer

    def silent(self, now: float, timeout_s: float) -> list[bytes]:
        """Clients not heard from for ``timeout_s``."""
        return [identity for identity, peer in self._peers.items() if now - peer.stats.last_seen > timeout_s]

    @property
    def peers(self) -> Iterable[Peer]:
        """Every connected client's record (read-only use)."""
        return self._peers.values()

    @property
    def inflight(self) -> int:
        """Batches in every client's window."""
        return sum(len(peer.inflight) for peer in self._peers.values())

    # -- the window ------------------------------------------------------------------------------

    @staticmethod
    def note(peer: Peer, request: BatchRequest) -> None:
        """Record what a request says about its client (job, position, stall figures)."""
        stats = peer.stats
        stats.client_id = request.client
        stats.job_id, stats.epoch, stats.rank = request.job.job_id, request.key[1], request.key[2]
        stats.world_size = request.job.spec.world_size
        if request.waited_s is not None:
            stats.waited_s = request.waited_s
        if request.elapsed_s is not None:
            stats.elapsed_s = request.elapsed_s

    def decide(self, peer: Peer, key: BatchKey) -> Verdict:
        """Admit, park, refuse or ignore a request for ``key``; parking happens here."""
        if key in peer.inflight or key in peer.deferred:
            return Verdict.DUPLICATE
        if len(peer.inflight) < self.window:
            peer.inflight.add(key)
            return Verdict.ADMIT
        if len(peer.deferred) >= self.window:
            return Verdict.BUSY
        peer.deferred.append(key)
        return Verdict.DEFER

    def release(self, identity: bytes, key: BatchKey) -> None:
        """``key`` left the client's window without a completed send (failed, or the client is gone)."""
        peer = self._peers.get(identity)
        if peer is not None:
            peer.inflight.discard(key)

    def delivered(self, send: PendingSend, now: float) -> list[BatchKey]:
        """A send completed: count it, free its place, and return the parked keys that now fit."""
        peer = self._peers.get(send.identity)
        if peer is None:
            return []
        peer.inflight.discard(send.key)
        stats = peer.stats
        stats.batches += 1
        stats.images += send.images
        stats.bytes += send.nbytes
        stats.throughput.add(now, send.images, send.nbytes)
        admitted = []
        while peer.deferred and len(peer.inflight) < self.window:
            key = peer.deferred.popleft()
            peer.inflight.add(key)
            admitted.append(key)
        return admitted

    def clear_deferred(self) -> None:
        """Drop every parked request (draining: the clients will ask elsewhere)."""
        for peer in self._peers.values():
            peer.deferred.clear()
