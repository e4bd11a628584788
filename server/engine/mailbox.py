"""The engine thread's mailbox: other threads (the HTTP side) hand it functions to run, and a pipe
wakes its poll loop so they run at once instead of at the next timeout."""

from __future__ import annotations

import contextlib
import os
import queue
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

__all__ = ["Mailbox"]


class Mailbox:
    """Functions queued for the engine thread, each with a future for its result."""

    def __init__(self) -> None:
        self._commands: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Future[Any]]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._closed = False

    @property
    def fd(self) -> int:
        """Readable when commands are waiting: register it with the engine's poller."""
        return self._wake_r

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Future[Any]:
        """Queue ``fn(*args)`` for the engine thread (any thread may call this)."""
        future: Future[Any] = Future()
        if self._closed:
            future.set_exception(RuntimeError("engine is stopped"))
            return future
        self._commands.put((fn, args, future))
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        return future

    def run_pending(self) -> None:
        """Run every queued command on this (the engine) thread; a failing one fails only its future."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        while True:
            try:
                fn, args, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except Exception as exc:  # the caller gets the error, the loop goes on
                future.set_exception(exc)

    def close(self) -> None:
        """Refuse new commands and fail the queued ones."""
        self._closed = True
        while True:
            try:
                _, _, future = self._commands.get_nowait()
            except queue.Empty:
                break
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("engine stopped"))
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
