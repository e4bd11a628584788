"""Flow control: the server holds at most max_prefetch batches for a client that does not read."""

from __future__ import annotations

import time
import uuid

import zmq

from stoker.client.protocol.job import JobSpec
from stoker.client.protocol.wire import ErrorCode, Kind, decode, encode
from tests.helpers import http_json


def test_a_client_that_floods_requests_is_capped(cluster) -> None:
    server = cluster.start("--max-prefetch", "3")
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, 30000)
    socket.connect(server.data)
    try:
        job = JobSpec("demo", batch_size=4, image_size=32).to_wire()
        client = uuid.uuid4().hex
        for k in range(12):
            socket.send(encode(Kind.REQUEST, {"job": job, "epoch": 0, "rank": 0, "k": k, "client": client}))
        # Three are served, three are parked, the rest are refused as BUSY.
        busy = 0
        batches = []
        while len(batches) + busy < 9:
            frames = socket.recv_multipart()
            header = decode(frames[0])
            if header.kind is Kind.ERROR:
                assert header.fields["code"] == ErrorCode.BUSY
                busy += 1
            else:
                batches.append(header.fields["k"])
        status = http_json(server.http + "/status")[1]
        assert all(c["inflight"] <= 3 for c in status["clients"])
        assert busy == 6
        # Reading the first three releases the parked ones: exactly six batches in all.
        deadline = time.monotonic() + 30
        while len(batches) < 6 and time.monotonic() < deadline:
            header = decode(socket.recv_multipart()[0])
            assert header.kind is Kind.BATCH
            batches.append(header.fields["k"])
        assert sorted(batches) == [0, 1, 2, 3, 4, 5]
    finally:
        socket.close()
        context.term()
