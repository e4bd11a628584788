"""Hostile or broken input on the data socket: typed ERROR replies (or a dropped peer), never a crash
or a stall for other clients; and a client can never make the server open a path."""

from __future__ import annotations

import contextlib
import random

import msgpack
import pytest
import zmq

from stoker.client.protocol.job import JobSpec
from stoker.client.protocol.wire import MAX_HEADER_BYTES, PROTOCOL_VERSION, ErrorCode, Kind, decode, encode
from tests.helpers import Cluster, dealer, http_json, metrics, open_client

pytestmark = pytest.mark.slow

JOB = JobSpec("demo", batch_size=4, image_size=32).to_wire()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    servers = Cluster(tmp_path_factory.mktemp("hostile"))
    try:
        yield servers.start()
    finally:
        servers.close()


@pytest.fixture
def raw_socket():
    with contextlib.ExitStack() as stack:
        yield lambda endpoint: stack.enter_context(dealer(endpoint, timeout_ms=15000))


def ask(socket: zmq.Socket, *frames: bytes) -> dict:
    socket.send_multipart(list(frames))
    reply = socket.recv_multipart()
    header = decode(reply[0])
    assert header.kind is Kind.ERROR, header
    return header.fields


def request(**fields) -> bytes:
    body = {"job": JOB, "epoch": 0, "rank": 0, "k": 0, "client": "x"} | fields
    return encode(Kind.REQUEST, body)


@pytest.mark.parametrize(
    ("frames", "code", "needle"),
    [
        ([b"\x00garbage"], ErrorCode.BAD_MESSAGE, "msgpack"),
        ([b""], ErrorCode.BAD_MESSAGE, "msgpack"),
        ([request(), b"extra"], ErrorCode.BAD_MESSAGE, "one header frame"),
        ([msgpack.packb(["stoker", 99, 3, {}])], ErrorCode.UNSUPPORTED_VERSION, "version 99"),
        ([msgpack.packb(["stoker", PROTOCOL_VERSION, 42, {}])], ErrorCode.BAD_MESSAGE, "unknown message kind"),
        (
            [
                encode(
                    Kind.BATCH,
                    {
                        "job_id": "x",
                        "epoch": 0,
                        "rank": 0,
                        "k": 0,
                        "dtype": "uint8",
                        "shape": [1],
                        "labels": [],
                        "indices": [],
                    },
                )
            ],
            ErrorCode.BAD_MESSAGE,
            "clients do not send BATCH",
        ),
        ([request(job=JOB | {"batch_size": 10**9})], ErrorCode.INVALID_JOB, "batch_size"),
        ([request(job=JOB | {"image_size": 4000})], ErrorCode.INVALID_JOB, "max_image_size"),
        ([request(job=JOB | {"dataset": "/etc/passwd"})], ErrorCode.INVALID_JOB, "dataset="),
        ([request(job=JOB | {"dataset": "passwd"})], ErrorCode.UNKNOWN_DATASET, "['demo']"),
        ([request(job=JOB | {"pipeline": "exec"})], ErrorCode.UNKNOWN_PIPELINE, "'train'"),
        ([request(job=JOB | {"evil": "__import__('os')"})], ErrorCode.INVALID_JOB, "unknown job fields"),
        ([request(k=10**6)], ErrorCode.OUT_OF_RANGE, "past the end"),
        ([request(rank=5)], ErrorCode.OUT_OF_RANGE, "rank=5"),
        ([request(epoch=-1)], ErrorCode.OUT_OF_RANGE, "epoch=-1"),
        ([request(fingerprint="not-this-dataset")], ErrorCode.DATASET_CHANGED, "differs"),
    ],
)
def test_each_kind_of_bad_input_gets_a_typed_error(shared_server, raw_socket, frames, code, needle) -> None:
    error = ask(raw_socket(shared_server.data), *frames)
    assert error["code"] == code and needle in error["message"], error


def test_oversized_frames_drop_the_peer_and_nothing_else(cluster, raw_socket) -> None:
    server = cluster.start()
    hostile = raw_socket(server.data)
    hostile.send(b"\x95" + b"x" * (MAX_HEADER_BYTES * 4))  # over MAXMSGSIZE: ZeroMQ disconnects it
    with open_client(server.data, batch_size=8, image_size=32, timeout_s=30) as batches:
        assert sum(images.shape[0] for images, _, _ in batches) == 48
    assert http_json(server.http + "/healthz")[0] == 200


def test_a_storm_of_random_frames_leaves_the_server_serving(cluster, raw_socket) -> None:
    server = cluster.start()
    rng = random.Random(1234)
    valid = [
        request(k=rng.randrange(12)),
        encode(Kind.HELLO, {"job": JOB, "client": "y"}),
        encode(Kind.BYE, {"client": "y"}),
    ]
    sockets = [raw_socket(server.data) for _ in range(4)]
    for i in range(1500):
        socket = sockets[i % len(sockets)]
        choice = rng.random()
        if choice < 0.3:
            frames = [rng.randbytes(rng.randrange(0, 300))]
        elif choice < 0.7:  # a valid message with flipped, cut or appended bytes
            frame = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 6)):
                frame[rng.randrange(len(frame))] = rng.randrange(256)
            frame = frame[: rng.randrange(1, len(frame) + 1)] if rng.random() < 0.3 else frame
            frames = [bytes(frame)]
        elif choice < 0.85:  # multipart junk
            frames = [rng.randbytes(rng.randrange(1, 50)) for _ in range(rng.randrange(2, 6))]
        else:  # structurally valid msgpack, wrong content
            fields = {rng.choice(["job", "k", "epoch", "client", "rank"]): rng.choice([None, -1, "x", [1], {}, 2**63])}
            frames = [msgpack.packb(["stoker", PROTOCOL_VERSION, rng.randrange(0, 9), fields])]
        socket.send_multipart(frames)
    # Drain replies for a while: every reply must be well-formed.
    for socket in sockets:
        socket.setsockopt(zmq.RCVTIMEO, 200)
        while True:
            try:
                reply = socket.recv_multipart()
            except zmq.Again:
                break
            assert decode(reply[0]).kind in (Kind.ERROR, Kind.BATCH, Kind.JOB_INFO)
    # A well-behaved client still completes an epoch, and the server is healthy.
    with open_client(server.data, batch_size=4, image_size=32, timeout_s=30) as batches:
        assert sorted(int(i) for _, _, idx in batches for i in idx) == list(range(48))
    assert http_json(server.http + "/healthz")[0] == 200
    assert server.process.poll() is None
    values = metrics(server.http)
    assert values["stoker_errors_total|code=BAD_MESSAGE"] > 100
    assert "Traceback" not in cluster.logs(), "no unexpected exception while handling hostile input"
