"""A client's live resources: the :class:`Session` with every server and the pinned receive buffers,
opened on first use, dropped by a forked copy, never pickled (a DataLoader worker connects afresh)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from stoker.client.protocol.job import JobSpec
from stoker.client.protocol.keys import load_key_pair, load_public_key
from stoker.client.runtime.buffers import PinnedPool
from stoker.client.runtime.links import ClientKeys
from stoker.client.runtime.session import JobInfo, Session

__all__ = ["Connection", "KeySource", "client_keys"]

KeySource = str | os.PathLike[str] | None


def client_keys(server_key: KeySource, client_key: KeySource) -> ClientKeys | None:
    """CURVE keys from the arguments, else ``STOKER_SERVER_KEY`` / ``STOKER_CLIENT_KEY_FILE``; ``None``
    when neither names any (a loader on loopback, or one that allows unauthenticated clients)."""
    server = server_key if server_key is not None else os.environ.get("STOKER_SERVER_KEY") or None
    client = client_key if client_key is not None else os.environ.get("STOKER_CLIENT_KEY_FILE") or None
    if server is None and client is None:
        return None
    if server is None or client is None:
        missing = "server_key (STOKER_SERVER_KEY)" if server is None else "client_key (STOKER_CLIENT_KEY_FILE)"
        raise ValueError(f"CURVE needs both the server's public key and this client's key pair: {missing} is missing")
    public, secret = load_key_pair(client)
    return ClientKeys(load_public_key(server), public, secret)


class Connection:
    """The session for ``spec``'s ``rank`` with every server in ``endpoints``, and (on CUDA) the pinned
    buffers batches are received into. ``progress`` gives the figures every request carries."""

    def __init__(
        self,
        endpoints: Sequence[str],
        spec: JobSpec,
        rank: int,
        *,
        prefetch: int,
        timeout_s: float,
        resolve_interval_s: float,
        keys: ClientKeys | None,
        device: torch.device,
        progress: Callable[[], dict[str, float]],
    ) -> None:
        self._endpoints = list(endpoints)
        self._spec = spec
        self._rank = rank
        self._prefetch = prefetch
        self._timeout_s = timeout_s
        self._resolve_interval_s = resolve_interval_s
        self._keys = keys
        self._cuda = device.type == "cuda"
        self._progress = progress
        self._owner_pid = os.getpid()
        self.session: Session | None = None
        self.pinned: PinnedPool | None = None
        """Pinned receive buffers, on CUDA while open; the converter gives each back after its copy."""

    @property
    def info(self) -> JobInfo | None:
        """The job as the servers describe it, or ``None`` before :meth:`open` succeeded."""
        return self.session.info if self.session is not None else None

    def left_behind_by_fork(self) -> bool:
        """Whether this is a forked copy (DataLoader workers fork by default). Its inherited sockets
        must not be used after fork: they are dropped unclosed here, and :meth:`open` connects afresh."""
        if self._owner_pid == os.getpid():
            return False
        self.session, self.pinned = None, None
        self._owner_pid = os.getpid()
        return True

    def open(self) -> JobInfo:
        """Connect (if not yet) and wait for the job info; on failure everything is closed again."""
        if self.session is None:
            if self._cuda and self.pinned is None:
                self.pinned = PinnedPool(self._prefetch + 4)
            self.session = Session(
                self._endpoints,
                self._spec,
                self._rank,
                self._prefetch,
                self._timeout_s,
                progress=self._progress,
                receive_into=self._pinned_buffer if self._cuda else None,
                resolve_interval_s=self._resolve_interval_s,
                keys=self._keys,
            )
        if self.session.info is None:
            try:
                self.session.open()
            except BaseException:
                self.close()
                raise
        info: JobInfo = self.session.info  # type: ignore[assignment]
        return info

    def close(self) -> None:
        """Close the session and release the pinned buffers. :meth:`open` connects again."""
        if self.session is not None:
            self.session.close()
            self.session = None
        if self.pinned is not None:
            self.pinned.close()
            self.pinned = None

    def __getstate__(self) -> dict[str, Any]:
        # A copy for another process (DataLoader workers) holds no live sockets; it connects on use.
        return {**self.__dict__, "session": None, "pinned": None}

    def _pinned_buffer(self, nbytes: int) -> tuple[memoryview, torch.Tensor]:
        if self.pinned is None:
            raise RuntimeError("pinned pool closed")  # unreachable while a CUDA session is open
        buffer = self.pinned.take(nbytes)
        return memoryview(buffer.numpy()), buffer
