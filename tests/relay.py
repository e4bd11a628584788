"""A TCP relay on loopback between a client and a server: it delays what goes towards the server (a
store some milliseconds away) and, when asked, records every byte either way (what an eavesdropper
on the network would capture)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import sys
import threading
from urllib.parse import urlsplit

__all__ = ["DelayRelay"]

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 30.0
_CONNECT_TIMEOUT_S = 10.0  # to the target, per connection


class DelayRelay:
    """A TCP relay on loopback (port 0) in front of ``host:port`` that holds every chunk going towards
    the server for ``delay_s`` before forwarding it: each request arrives ``delay_s`` late, as if the
    store were that far away. Chunks keep their order and are delayed once each (a pipeline, not a
    queue), and answers come back undelayed. ``endpoint`` is the relay's URL, ``tcp_endpoint`` its
    ZeroMQ form. With ``capture``, every byte forwarded either way is kept: what an eavesdropper on
    the network between the two sides would see."""

    def __init__(
        self, host: str, port: int, delay_s: float = 0.0, timeout_s: float = _START_TIMEOUT_S, capture: bool = False
    ) -> None:
        self.target = (host, port)
        self.delay_s = delay_s
        self.captured: bytearray | None = bytearray() if capture else None
        self._captured_lock = threading.Lock()
        self.connections = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="delay-relay", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"delay relay did not start within {timeout_s} s")
        if self._failure is not None:
            raise RuntimeError("delay relay failed to start") from self._failure

    @classmethod
    def to(cls, endpoint: str, delay_s: float = 0.0, capture: bool = False) -> DelayRelay:
        """A relay in front of ``endpoint``: ``http://host:port`` or ZeroMQ's ``tcp://host:port``."""
        parts = urlsplit(endpoint)
        return cls(parts.hostname or "127.0.0.1", parts.port or 80, delay_s, capture=capture)

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``, the relay's address."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def tcp_endpoint(self) -> str:
        """``tcp://127.0.0.1:PORT``: the relay's address for a ZeroMQ client."""
        return f"tcp://127.0.0.1:{self.port}"

    def contains(self, needle: bytes) -> bool:
        """Whether ``needle`` crossed the relay in either direction (``capture`` must be on)."""
        if self.captured is None:
            raise RuntimeError("this relay does not capture: DelayRelay(..., capture=True)")
        with self._captured_lock:
            return bytes(needle) in self.captured

    def _record(self, chunk: bytes) -> None:
        if self.captured is not None:
            with self._captured_lock:
                self.captured += chunk

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to the constructor, or logged if it comes later
            self._failure = exc
            if self._ready.is_set():
                log.exception("delay relay stopped with an error")
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            # A connection accepted while closing starts its task late, and a task cancelled before it
            # starts never closes its transport (asyncio warns about each one it finds unclosed): let
            # every task start (it registers itself), cancel the started ones, until no task is left.
            me = asyncio.current_task()
            while True:
                await asyncio.sleep(0)
                started = list(self._tasks)
                for task in started:
                    task.cancel()
                await asyncio.gather(*started, return_exceptions=True)
                if not any(task is not me for task in asyncio.all_tasks()):
                    break
            await server.wait_closed()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self.connections += 1
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            # Connect a socket we own: a connection cancelled half-way is closed here, not leaked.
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            upstream.setblocking(False)
            try:
                connecting = asyncio.get_running_loop().sock_connect(upstream, self.target)
                await asyncio.wait_for(connecting, _CONNECT_TIMEOUT_S)
                upstream_reader, upstream_writer = await asyncio.open_connection(sock=upstream)
            finally:
                if upstream_writer is None:
                    upstream.close()
            directions = [
                asyncio.ensure_future(self._forward_delayed(client_reader, upstream_writer)),
                asyncio.ensure_future(self._forward(upstream_reader, client_writer)),
            ]
            try:
                await asyncio.wait(directions, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for direction in directions:
                    direction.cancel()
                # Either side going away (a reset, a refused upstream) just ends this connection.
                await asyncio.gather(*directions, return_exceptions=True)
        except (TimeoutError, OSError):
            pass  # the server could not be reached: the client sees its connection close
        except asyncio.CancelledError:
            # Only close() cancels; ending quietly spares asyncio's stream callback (3.11) a traceback.
            pass
        finally:
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(OSError, asyncio.CancelledError):
                        await writer.wait_closed()
            if task is not None:
                self._tasks.discard(task)

    async def _forward_delayed(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        pending: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, chunk = await pending.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not chunk:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(chunk)
                await writer.drain()

        sender = asyncio.ensure_future(send())
        try:
            while True:
                chunk = await reader.read(65536)
                self._record(chunk)
                pending.put_nowait((loop.time() + self.delay_s, chunk))
                if not chunk:
                    break
            await sender
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            self._record(chunk)
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop relaying, close every connection, and join the thread."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"delay relay did not stop within {timeout_s} s")
        # A transport whose peer never finished closing is left in a reference cycle by the ended loop;
        # collect it here, where its ResourceWarning is the relay's own, not whichever test runs next.
        previous = sys.unraisablehook
        sys.unraisablehook = lambda u: None if isinstance(u.exc_value, ResourceWarning) else previous(u)
        try:
            gc.collect()
        finally:
            sys.unraisablehook = previous

    def __enter__(self) -> DelayRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
