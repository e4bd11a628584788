"""The wire path alone: stoker's ROUTER transport sending shared-memory batches, zero-copy, to a
DEALER client over loopback TCP; no decoding. Measures GB/s."""

from __future__ import annotations

import threading
import time

import zmq

from stoker.client.protocol.wire import Kind, decode, encode
from stoker.server.engine.transport import Transport
from stoker.server.workers.slots import SlotPool

__all__ = ["wire_rate"]


def wire_rate(seconds: float, shape: tuple[int, int, int, int] = (256, 224, 224, 3), window: int = 4) -> float:
    """GB/s of batches of ``shape`` moved by the transport with ``window`` requests in flight."""
    nbytes = shape[0] * shape[1] * shape[2] * shape[3]
    # Separate contexts, as server and client are separate processes in real use: each side gets its
    # own ZeroMQ I/O thread.
    context, client_context = zmq.Context(), zmq.Context()
    pool = SlotPool(4 * nbytes)
    slot = pool.acquire(nbytes)
    if slot is None:
        raise RuntimeError("cannot allocate a shared-memory slot for the wire benchmark")
    slot.view(nbytes)[:] = b"\x7f" * nbytes
    transport = Transport(context, "tcp://127.0.0.1:0")
    header = encode(
        Kind.BATCH,
        {
            "job_id": "wire",
            "epoch": 0,
            "rank": 0,
            "k": 0,
            "dtype": "uint8",
            "shape": list(shape),
            "labels": [0] * shape[0],
            "indices": [0] * shape[0],
        },
    )
    stop = threading.Event()

    def serve() -> None:
        trackers: list[zmq.MessageTracker] = []
        while not stop.is_set():
            if transport.socket.poll(50):
                for incoming in transport.receive():
                    tracker = transport.send_batch(incoming.identity, header, slot.view(nbytes), nbytes // shape[0])
                    if tracker is not None:
                        trackers.append(tracker)
            trackers = [t for t in trackers if not t.done]

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    client = client_context.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(transport.endpoint)
    request = encode(Kind.REQUEST, {"job": {}, "epoch": 0, "rank": 0, "k": 0, "client": "wire"})
    try:
        for _ in range(window):
            client.send(request)
        received, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            head, *payload = client.recv_multipart(copy=False)  # frames kept as ZeroMQ buffers: no copy
            decode(head.bytes)
            received += sum(len(frame.buffer) for frame in payload)
            client.send(request)
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        server.join(5)
        # The sending side goes first, while the client is still connected. Closing the client first
        # can drop the TCP connection while the server's I/O thread is half way through a multipart
        # batch and its socket is closing: libzmq 4.3 then aborts the process (session_base.cpp,
        # "Resource temporarily unavailable"). context.term() also waits until ZeroMQ has let go of
        # the shared-memory slot it was sending from, before the pool unmaps it.
        transport.close()
        context.term()
        client.close(linger=0)
        client_context.term()
        pool.release(slot)
        pool.close()
    return received / elapsed / 1e9
