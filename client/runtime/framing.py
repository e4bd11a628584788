"""Receiving the frames of one ZeroMQ multipart message: image bytes into a buffer, or discarded.

A message must always be read to its last frame, even when it is refused: the next ``recv`` on the
socket would otherwise return the rest of this message as if it were the header of the next one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from stoker.client.protocol.wire import MAX_PART_BYTES

__all__ = ["discard_rest", "receive_parts", "receive_payload"]


def discard_rest(socket: zmq.Socket, more: int) -> None:
    """Read and drop the remaining frames of the current message (``more``: its ``RCVMORE``)."""
    while more:
        socket.recv(copy=False)
        more = socket.getsockopt(zmq.RCVMORE)


def receive_parts(socket: zmq.Socket, view: memoryview, nbytes: int, tail: bool = False) -> int:
    """Receive the remaining frames one after another into ``view``; return the bytes received, or -1
    when they overflow ``nbytes`` (the rest is discarded). ``tail``: frames after the first ``nbytes``
    (a mask, the targets) are left for the caller."""
    offset = 0
    while True:
        if tail and offset == nbytes and nbytes:
            return offset
        size = socket.recv_into(view[offset:nbytes]) if offset < nbytes else socket.recv_into(bytearray())
        offset += size
        more = socket.getsockopt(zmq.RCVMORE)
        if offset > nbytes:
            discard_rest(socket, more)
            return -1
        if not more:
            return offset


def receive_payload(
    socket: zmq.Socket,
    nbytes: int,
    receive_into: Callable[[int], tuple[memoryview, Any]] | None,
    tail: bool = False,
) -> tuple[Any, int]:
    """Receive a batch's image frames (the header was read, more frames follow): ``(data, received)``.

    ``data`` is what ``receive_into`` gave for the bytes (a pinned tensor), ZeroMQ's own frame when
    the batch came in one frame, or a numpy array the frames were gathered into. ``received`` is the
    byte count, or -1 when the frames hold more than ``nbytes``; the message is read to its end, unless
    ``tail``: then the frames after the images are left for the caller.
    """
    if receive_into is not None:
        view, data = receive_into(nbytes)
        return data, receive_parts(socket, view, nbytes, tail)
    if nbytes <= MAX_PART_BYTES:
        frame = socket.recv(copy=False)  # one frame: hand ZeroMQ's buffer over, no copy
        more = socket.getsockopt(zmq.RCVMORE)
        if tail:
            return frame, len(frame.buffer)
        discard_rest(socket, more)
        return frame, -1 if more else len(frame.buffer)
    data = np.empty(nbytes, dtype=np.uint8)  # several frames: gather them into one array
    return data, receive_parts(socket, memoryview(data), nbytes, tail)
