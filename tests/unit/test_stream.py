"""The client's session and batch stream, driven in-process over real ZeroMQ sockets on loopback.

What a real server cannot be made to do on demand (answer out of order, send a late duplicate, say
BUSY, fail with INTERNAL, send garbage, vanish from DNS) is played by :class:`ScriptedServer`: a
ROUTER socket in a thread that speaks the wire format. Everything on the client side is real.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import zmq

from stoker.client.protocol.errors import BadSampleError, ProtocolError, ServerError, UnknownDatasetError
from stoker.client.protocol.job import JobSpec
from stoker.client.protocol.wire import ErrorCode, Kind, decode, encode
from stoker.client.runtime.replies import server_error
from stoker.client.runtime.session import Session
from stoker.client.runtime.stream import BatchStream, Item

SPEC = JobSpec("demo", image_size=8, batch_size=2, shuffle=False)
IMAGE_BYTES = 2 * 2 * 2 * 3  # a batch: two 2 x 2 RGB images
JOB_INFO = {
    "job_id": SPEC.job_id,
    "samples": 16,
    "classes": ["a", "b"],
    "batches": 8,
    "image_shape": [2, 2, 3],
    "fingerprint": "f0",
    "prefetch": 16,
}
WAIT_S = 5.0
"""Bound on every wait in this file; the client's ``timeout_s`` too, unless a test says otherwise."""

Message = list[bytes]
Answer = Callable[[dict[str, Any]], list[Message]]


def batch(fields: dict[str, Any]) -> Message:
    """The ``BATCH`` answering a ``REQUEST``: two images whose every byte is ``k``."""
    k = fields["k"]
    header = {
        "job_id": SPEC.job_id,
        "epoch": fields["epoch"],
        "rank": fields["rank"],
        "k": k,
        "dtype": "uint8",
        "shape": [2, 2, 2, 3],
        "labels": [0, 1],
        "indices": [2 * k, 2 * k + 1],
    }
    return [encode(Kind.BATCH, header), bytes([k]) * IMAGE_BYTES]


def error(fields: dict[str, Any], code: ErrorCode, **extra: Any) -> Message:
    """An ``ERROR`` about the request ``fields``."""
    about = {name: fields[name] for name in ("epoch", "rank", "k")}
    return [encode(Kind.ERROR, {"code": int(code), "message": f"scripted {code.name}", **about, **extra})]


class ScriptedServer:
    """A stand-in loader server: answers ``HELLO`` with ``JOB_INFO`` and each ``REQUEST`` with what
    ``answer`` returns; ``idle`` is asked for messages whenever no message came for 30 ms.

    Every message received is recorded as ``(kind, fields, monotonic time)``. An exception in the
    script is raised again by :meth:`close`, so a broken script fails its test instead of hanging it.
    """

    def __init__(
        self,
        answer: Answer = lambda fields: [batch(fields)],
        idle: Callable[[], list[Message]] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.answer = answer
        self.idle: Callable[[], list[Message]] = idle or list
        self.received: list[tuple[Kind, dict[str, Any], float]] = []
        self._changed = threading.Condition()
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError:
            self._socket.close()
            self._context.term()
            raise
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.port = int(self.endpoint.rsplit(":", 1)[1])
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name=f"scripted {self.endpoint}", daemon=True)
        self._thread.start()

    def requests(self, k: int | None = None) -> list[dict[str, Any]]:
        """The ``REQUEST`` fields received so far (for batch ``k`` only, if given)."""
        with self._changed:
            return [f for kind, f, _ in self.received if kind == Kind.REQUEST and k in (None, f["k"])]

    def wait_for(self, kind: Kind) -> None:
        """Wait (bounded) until a message of ``kind`` has arrived."""
        with self._changed:
            if not self._changed.wait_for(lambda: any(got == kind for got, _, _ in self.received), WAIT_S):
                raise AssertionError(f"{self.endpoint} got no {kind.name} within {WAIT_S} s")

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._socket.poll(30):
                    self._send(None, self.idle())
                    continue
                identity, frame = self._socket.recv_multipart()
                header = decode(frame)
                with self._changed:
                    self.received.append((header.kind, header.fields, time.monotonic()))
                    self._changed.notify_all()
                if header.kind == Kind.HELLO:
                    job_id = JobSpec.from_wire(header.fields["job"]).job_id  # whatever layout it asked
                    self._send(identity, [[encode(Kind.JOB_INFO, {**JOB_INFO, "job_id": job_id})]])
                elif header.kind == Kind.REQUEST:
                    self._send(identity, self.answer({**header.fields, "identity": identity}))
        except BaseException as exc:  # handed to the test by close()
            self._failure = exc

    def _send(self, identity: bytes | None, messages: list[Message]) -> None:
        for message in messages:
            # Messages sent when idle answer no message in particular: they carry their identity
            # frame themselves (see addressed()).
            self._socket.send_multipart(message if identity is None else [identity, *message])

    def close(self) -> None:
        """Stop the thread (bounded), close the socket; raise what the script raised, if anything."""
        self._stop.set()
        self._thread.join(WAIT_S)
        if self._thread.is_alive():  # its socket is still in use: leave it to the daemon thread
            raise AssertionError(f"scripted server {self.endpoint} did not stop")
        self._socket.close(linger=0)
        self._context.term()
        if self._failure is not None:
            raise self._failure


def addressed(fields: dict[str, Any], message: Message) -> Message:
    """``message`` prefixed with the identity of the client that sent ``fields`` (to send it later)."""
    return [fields["identity"], *message]


@contextmanager
def scripted(*args: Any, **kwargs: Any) -> Iterator[ScriptedServer]:
    """A :class:`ScriptedServer` for the ``with`` block."""
    server = ScriptedServer(*args, **kwargs)
    try:
        yield server
    finally:
        server.close()


@contextmanager
def session_to(*endpoints: str, prefetch: int = 4, timeout_s: float = WAIT_S, **kwargs: Any) -> Iterator[Session]:
    """An open session (job info received) to ``endpoints``, closed afterwards."""
    with Session(list(endpoints), SPEC, 0, prefetch, timeout_s, **kwargs) as session:
        session.open()
        yield session


def fetch(session: Session, items: list[Item], prefetch: int = 4) -> list[tuple[Item, bytes]]:
    """``items`` through a :class:`BatchStream`: each batch's ``(epoch, k)`` and image bytes."""
    stream = BatchStream(session, items, prefetch)
    try:
        got = [stream.get(item) for item in items]
    finally:
        stream.close()
    return [((raw.epoch, raw.k), bytes(raw.data.buffer)) for raw in got]


def expected(items: list[Item]) -> list[tuple[Item, bytes]]:
    return [(item, bytes([item[1]]) * IMAGE_BYTES) for item in items]


# -- tests -------------------------------------------------------------------------------------------


def test_a_session_opens_the_job_and_closes_as_a_context_manager() -> None:
    with scripted() as server:
        with session_to(server.endpoint) as session:
            assert session.info is not None and session.info.job_id == SPEC.job_id
            assert session.info.prefetch == 4  # the smaller of ours and the server's grant
            assert [link.usable for link in session.links] == [True]
            server.wait_for(Kind.HELLO)
            arrivals = session.poll(0.0)
            assert not arrivals.batches and not arrivals.errors
        assert session.links == []
        session.close()  # a second close is harmless


def test_batches_answered_out_of_order_come_out_in_order_within_the_window() -> None:
    held: list[Message] = []
    sent_order: list[int] = []

    def answer(fields: dict[str, Any]) -> list[Message]:
        held.append(batch(fields))
        if len(held) < 4:
            return []
        replies = held[::-1]  # the window's batches, last first
        held.clear()
        sent_order.extend(decode(message[0]).fields["k"] for message in replies)
        return replies

    items = [(0, k) for k in range(8)]
    with scripted(answer) as server, session_to(server.endpoint) as session:
        assert fetch(session, items) == expected(items)
    assert sent_order == [3, 2, 1, 0, 7, 6, 5, 4]


def test_batches_are_received_into_the_callers_buffers_frame_by_frame() -> None:
    """The pinned-buffer path (``receive_into``), here with plain host buffers: a batch sent as one
    frame per image lands in the buffer the caller handed out, and that buffer is the batch's data."""
    buffers: list[np.ndarray] = []

    def receive_into(nbytes: int) -> tuple[memoryview, np.ndarray]:
        buffers.append(np.zeros(nbytes + 8, dtype=np.uint8))  # pools hand out buffers at least that big
        return memoryview(buffers[-1]), buffers[-1]

    def answer(fields: dict[str, Any]) -> list[Message]:
        header, images = batch(fields)
        return [[header, images[: IMAGE_BYTES // 2], images[IMAGE_BYTES // 2 :]]]

    items = [(0, k) for k in range(3)]
    with scripted(answer) as server, session_to(server.endpoint, receive_into=receive_into) as session:
        stream = BatchStream(session, items, 2)
        got = [stream.get(item) for item in items]
        stream.close()
    for raw, item in zip(got, items, strict=True):
        assert any(raw.data is buffer for buffer in buffers)
        assert raw.data[:IMAGE_BYTES].tobytes() == bytes([item[1]]) * IMAGE_BYTES


def test_a_late_duplicate_after_a_re_ask_is_dropped() -> None:
    first: list[Message] = []

    def answer(fields: dict[str, Any]) -> list[Message]:
        if fields["k"] != 0:
            return [batch(fields)]
        if not first:  # the first ask goes unanswered until the client asks again
            first.append(batch(fields))
            return []
        return [batch(fields), *first]  # the re-ask's answer, then the first ask's, late

    items = [(0, k) for k in range(4)]
    with scripted(answer) as server, session_to(server.endpoint) as session:
        assert fetch(session, items, prefetch=2) == expected(items)
        assert len(server.requests(k=0)) == 2
        assert [f["k"] for f in server.requests()] == [0, 1, 0, 2, 3]


def test_busy_waits_retry_after_s_and_shrinks_the_window_to_the_servers_prefetch() -> None:
    held: list[Message] = []
    groups: list[int] = []
    busy_at: list[float] = []

    def answer(fields: dict[str, Any]) -> list[Message]:
        if not busy_at:
            busy_at.append(time.monotonic())
            return [error(fields, ErrorCode.BUSY, retry_after_s=0.3, prefetch=1)]
        held.append(addressed(fields, batch(fields)))
        return []

    def idle() -> list[Message]:  # answer once the client stops asking: what it has in flight
        if held:
            groups.append(len(held))
        replies = list(held)
        held.clear()
        return replies

    items = [(0, k) for k in range(6)]
    with scripted(answer, idle) as server, session_to(server.endpoint) as session:
        stream = BatchStream(session, items, 4)
        got = [stream.get(item) for item in items]
        stream.close()
        assert [(raw.epoch, raw.k) for raw in got] == items
        assert stream.prefetch == 1
        asked_again = [t for kind, f, t in server.received if kind == Kind.REQUEST and f["k"] == 0][1]
        assert asked_again - busy_at[0] >= 0.3
    # The requests sent before BUSY arrived are answered as a group; after it, one at a time.
    assert groups[-3:] == [1, 1, 1], groups


def test_internal_three_times_then_a_typed_error_with_the_servers_evidence() -> None:
    traceback = 'Traceback (most recent call last):\n  File "worker.py", line 9, in run\nValueError: boom\n'

    def answer(fields: dict[str, Any]) -> list[Message]:
        if fields["k"] == 1:
            return [error(fields, ErrorCode.INTERNAL, path="/data/b/7.jpg", reason="boom", traceback=traceback)]
        return [batch(fields)]

    with scripted(answer) as server, session_to(server.endpoint, timeout_s=30.0) as session:
        stream = BatchStream(session, [(0, 0), (0, 1), (0, 2)], 2)
        assert stream.get((0, 0)).k == 0
        started = time.monotonic()
        with pytest.raises(ServerError) as caught:
            stream.get((0, 1))
        assert time.monotonic() - started < WAIT_S, "raised by the retry limit, not by timeout_s"
        stream.close()
        assert len(server.requests(k=1)) == 4  # the first ask and three more
    exc = caught.value
    assert type(exc) is ServerError and exc.code == ErrorCode.INTERNAL and exc.endpoint == server.endpoint
    notes = "\n".join(exc.__notes__)
    assert f"reported by stoker server {server.endpoint}" in notes
    assert "batch 1 of epoch 0, rank 0" in notes
    assert "sample /data/b/7.jpg: boom" in notes
    assert "ValueError: boom" in notes and 'File "worker.py", line 9' in notes
    assert "asked 4 times" in notes


def test_internal_that_clears_on_a_retry_delivers_the_batch() -> None:
    def answer(fields: dict[str, Any]) -> list[Message]:
        if fields["k"] == 0 and len(server.requests(k=0)) <= 3:  # three failures: still within the limit
            return [error(fields, ErrorCode.INTERNAL)]
        return [batch(fields)]

    items = [(0, 0), (0, 1)]
    with scripted(answer) as server, session_to(server.endpoint) as session:
        assert fetch(session, items) == expected(items)
        assert len(server.requests(k=0)) == 4


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (lambda fields: [b"\x93not a stoker header"], "malformed message"),
        (lambda fields: [batch(fields)[0], b"\x00" * 10], "sent 10 image bytes"),
        (lambda fields: [batch(fields)[0]], "inconsistent BATCH header"),
        (lambda fields: [encode(Kind.HELLO, {"job": {}, "client": "x"})], "unexpected HELLO"),
    ],
    ids=["garbage", "short-images", "no-images", "wrong-kind"],
)
def test_a_malformed_frame_from_the_server_is_a_protocol_error(reply, match: str) -> None:
    with scripted(lambda fields: [reply(fields)]) as server, session_to(server.endpoint) as session:
        stream = BatchStream(session, [(0, 0)], 1)
        started = time.monotonic()
        with pytest.raises(ProtocolError, match=match) as caught:
            stream.get((0, 0))
        assert server.endpoint in str(caught.value)
        assert time.monotonic() - started < WAIT_S
        stream.close()


def test_an_error_that_is_not_transient_is_raised_typed() -> None:
    def answer(fields: dict[str, Any]) -> list[Message]:
        return [error(fields, ErrorCode.BAD_SAMPLE, path="/data/a/1.jpg", reason="truncated JPEG")]

    with scripted(answer) as server, session_to(server.endpoint) as session:
        stream = BatchStream(session, [(0, 0)], 1)
        with pytest.raises(BadSampleError) as caught:
            stream.get((0, 0))
        with pytest.raises(BadSampleError):  # the stream stays failed: the batch cannot be made
            stream.get((0, 0))
        stream.close()
    assert caught.value.path == "/data/a/1.jpg" and caught.value.reason == "truncated JPEG"
    assert "sample /data/a/1.jpg: truncated JPEG" in caught.value.__notes__


def test_error_fields_become_typed_exceptions_with_notes() -> None:
    unknown = server_error({"code": ErrorCode.UNKNOWN_DATASET, "message": "unknown dataset 'x'"}, "tcp://h:1")
    assert isinstance(unknown, UnknownDatasetError) and unknown.__notes__ == ["reported by stoker server tcp://h:1"]
    refused = server_error({"code": ErrorCode.BAD_MESSAGE, "message": "bad magic"}, "tcp://h:1")
    assert type(refused) is ProtocolError and "bad magic" in str(refused)
    internal = server_error(
        {"code": ErrorCode.INTERNAL, "message": "internal error", "traceback": "Traceback...\nKeyError: 3\n"},
        "tcp://h:1",
    )
    assert internal.__notes__[-1] == "server traceback:\nTraceback...\nKeyError: 3"


def test_a_server_that_vanishes_from_dns_has_its_batches_asked_elsewhere(monkeypatch, caplog) -> None:
    answer_of_dns = ["127.0.0.1", "127.0.0.2"]

    def hold_and_vanish(fields: dict[str, Any]) -> list[Message]:
        answer_of_dns[:] = ["127.0.0.2"]  # what a rolling replacement does to the name
        return []  # never answered: only leaving DNS gets these batches asked elsewhere

    with scripted(hold_and_vanish) as leaving:
        try:
            staying = ScriptedServer(host="127.0.0.2", port=leaving.port)
        except zmq.ZMQError:
            pytest.skip("needs 127.0.0.2 on the loopback interface")
        try:
            real_getaddrinfo = socket.getaddrinfo

            def dns(host, *args, **kwargs):
                if host != "loaders.stoker.test":
                    return real_getaddrinfo(host, *args, **kwargs)
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, leaving.port)) for a in answer_of_dns]

            monkeypatch.setattr(socket, "getaddrinfo", dns)
            items = [(0, k) for k in range(8)]
            with caplog.at_level(logging.DEBUG, logger="stoker.client.runtime"):
                endpoint = f"dns+tcp://loaders.stoker.test:{leaving.port}"
                with session_to(endpoint, resolve_interval_s=0.05) as session:
                    assert len(session.links) == 2
                    assert fetch(session, items) == expected(items)
                    assert [link.endpoint for link in session.links] == [staying.endpoint]
        finally:
            staying.close()
    assert leaving.requests(), "the leaving server was asked for something before it left"
    messages = [record.getMessage() for record in caplog.records]
    assert f"server {leaving.endpoint} removed (no longer in DNS)" in messages, messages
    assert not [m for m in messages if m.startswith("re-asked")], "handed over at once, not after a timeout"
