"""A TCP relay on loopback that records every byte it forwards: what an eavesdropper on the network
between a client and a server would capture."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading

__all__ = ["CaptureRelay"]


class CaptureRelay:
    """Listens on ``127.0.0.1:port`` (port 0), forwards each connection to ``target`` and keeps a copy
    of both directions in :attr:`captured`. ``endpoint`` is the ``tcp://`` address to connect to."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.captured = bytearray()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, name="capture-relay", daemon=True)
        self._accepting.start()

    @classmethod
    def to(cls, endpoint: str) -> CaptureRelay:
        """A relay in front of the ZeroMQ ``tcp://HOST:PORT`` endpoint."""
        host, _, port = endpoint[len("tcp://") :].rpartition(":")
        return cls((host.strip("[]"), int(port)))

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"

    def contains(self, needle: bytes) -> bool:
        with self._lock:
            return bytes(needle) in self.captured

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._pipe, args=(client,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _pipe(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        peers = {client: upstream, upstream: client}
        with selectors.DefaultSelector() as selector, client, upstream:
            for sock in peers:
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select(0.1):
                    source = key.fileobj
                    try:
                        chunk = source.recv(1 << 16)  # type: ignore[union-attr]
                    except BlockingIOError:
                        continue
                    except OSError:
                        return
                    if not chunk:
                        return
                    with self._lock:
                        self.captured += chunk
                    destination = peers[source]  # type: ignore[index]
                    destination.setblocking(True)
                    try:
                        destination.sendall(chunk)
                    except OSError:
                        return
                    finally:
                        destination.setblocking(False)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._accepting.join(5)
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> CaptureRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
