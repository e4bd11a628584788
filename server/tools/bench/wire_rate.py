"""The wire path alone: stoker's ROUTER transport sending shared-memory batches, zero-copy, to a
DEALER client over loopback TCP; no decoding. Measures GB/s."""

from __future__ import annotations

import threading
import time

import zmq

from stoker.client.protocol.keys import load_key_pair, load_public_key
from stoker.client.protocol.wire import Kind, decode, encode
from stoker.server.engine.transport import DataPlane
from stoker.server.settings import EngineSettings
from stoker.server.tools.bench.keys import BenchKeys
from stoker.server.workers.slots import SlotPool

__all__ = ["wire_rate"]


class _Sender:
    """A thread answering every request with the same batch, sent from one shared-memory slot."""

    def __init__(self, shape: tuple[int, int, int, int], keys: BenchKeys | None = None) -> None:
        self.shape = shape
        self.nbytes = shape[0] * shape[1] * shape[2] * shape[3]
        self.slots = SlotPool(4 * self.nbytes)
        slot = self.slots.acquire(self.nbytes)
        if slot is None:
            raise RuntimeError("cannot allocate a shared-memory slot for the wire benchmark")
        self.slot = slot
        slot.view(self.nbytes)[:] = b"\x7f" * self.nbytes
        # Its own context, as a server is its own process in real use: it gets its own I/O thread.
        secret, authorized = (str(keys.server_secret), str(keys.authorized)) if keys is not None else (None, None)
        heartbeat_ms = EngineSettings.model_fields["heartbeat_ms"].default
        self.plane = DataPlane("tcp://127.0.0.1:0", heartbeat_ms, secret, authorized)
        self.transport = self.plane.transport
        fields = {"job_id": "wire", "epoch": 0, "rank": 0, "k": 0, "dtype": "uint8", "shape": list(shape)}
        self.header = encode(Kind.BATCH, {**fields, "labels": [0] * shape[0], "indices": [0] * shape[0]})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="wire-sender", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        trackers: list[zmq.MessageTracker] = []
        transport, payload = self.transport, self.slot.view(self.nbytes)
        while not self._stop.is_set():
            if transport.socket.poll(50):
                for incoming in transport.receive():
                    tracker = transport.send_batch(
                        incoming.identity, self.header, payload, self.nbytes // self.shape[0]
                    )
                    if tracker is not None:
                        trackers.append(tracker)
            trackers = [t for t in trackers if not t.done]

    def close(self) -> None:
        """Stop the thread, then close the socket and wait for ZeroMQ to let go of the slot."""
        self._stop.set()
        self._thread.join(5)
        self.plane.close()  # its context's end waits until ZeroMQ has let go of the slot it was sending from
        self.slots.release(self.slot)
        self.slots.close()


def wire_rate(
    seconds: float,
    shape: tuple[int, int, int, int] = (256, 224, 224, 3),
    window: int = 4,
    keys: BenchKeys | None = None,
) -> float:
    """GB/s of batches of ``shape`` moved by the transport with ``window`` requests in flight (with
    CURVE authentication and encryption when given ``keys``)."""
    sender = _Sender(shape, keys)
    context = zmq.Context()
    client = context.socket(zmq.DEALER)
    if keys is not None:
        client.curve_serverkey = load_public_key(keys.server_public)
        client.curve_publickey, client.curve_secretkey = load_key_pair(keys.client_secret)
    client.setsockopt(zmq.LINGER, 0)
    client.setsockopt(zmq.RCVTIMEO, 30_000)  # a stuck sender fails the benchmark instead of hanging it
    client.connect(sender.transport.endpoint)
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
        # The sending side goes first, while the client is still connected. Closing the client first
        # can drop the TCP connection while the sender's I/O thread is half way through a multipart
        # batch and its socket is closing: libzmq 4.3 then aborts the process (session_base.cpp,
        # "Resource temporarily unavailable").
        sender.close()
        client.close(linger=0)
        context.term()
    return received / elapsed / 1e9
