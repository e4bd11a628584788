"""Flow control: the server holds at most max_prefetch batches for a client that does not read."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid

import pytest
import zmq

from stoker.client.protocol.job import JobSpec
from stoker.client.protocol.wire import ErrorCode, Kind, decode, encode
from tests.helpers import dealer, http_json

pytestmark = pytest.mark.slow


def test_a_client_that_floods_requests_is_capped(cluster) -> None:
    server = cluster.start("--max-prefetch", "3")
    with dealer(server.data) as socket:
        flood(server.http, socket)


def flood(http: str, socket: zmq.Socket) -> None:
    """Twelve requests at once with every worker held still: 3 admitted, 3 parked, 6 refused; once the
    workers go on, exactly the six admitted and parked batches arrive."""
    # The workers are held still while the flood arrives, so no batch can finish (and free a place)
    # before the last request is read: which requests are refused no longer depends on timing.
    workers = [w["pid"] for w in http_json(http + "/status")[1]["pool"]["workers"]]
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        job = JobSpec("demo", batch_size=4, image_size=32).to_wire()
        client = uuid.uuid4().hex
        for k in range(12):
            socket.send(encode(Kind.REQUEST, {"job": job, "epoch": 0, "rank": 0, "k": k, "client": client}))
        # Three are admitted, three are parked, the rest are refused as BUSY at once.
        busy = []
        while len(busy) < 6:
            header = decode(socket.recv_multipart()[0])
            assert header.kind is Kind.ERROR and header.fields["code"] == ErrorCode.BUSY, header
            busy.append(header.fields["k"])
            assert header.fields["prefetch"] == 3 and header.fields["retry_after_s"] > 0
        assert sorted(busy) == [6, 7, 8, 9, 10, 11]
        status = http_json(http + "/status")[1]
        assert all(c["inflight"] <= 3 for c in status["clients"])
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        batches: list[int] = []
        # Reading the first three releases the parked ones: exactly six batches in all.
        deadline = time.monotonic() + 30
        while len(batches) < 6 and time.monotonic() < deadline:
            header = decode(socket.recv_multipart()[0])
            assert header.kind is Kind.BATCH
            batches.append(header.fields["k"])
        assert sorted(batches) == [0, 1, 2, 3, 4, 5]
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
