"""The engine in-process: a real Engine (its thread, worker processes and ROUTER socket) spoken to by a
raw DEALER socket on loopback, without a server subprocess."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import zmq

from stoker.client.protocol.job import JobSpec
from stoker.client.protocol.plan import sample_seed
from stoker.client.protocol.wire import ErrorCode, Header, Kind, decode, encode
from stoker.server import failpoints
from stoker.server.data.catalog import Catalog, DatasetDecl
from stoker.server.engine import Engine
from stoker.server.engine.state import build_status
from stoker.server.imaging.pipelines import BUILTIN_PIPELINES
from stoker.server.imaging.render import StageTimes, render_sample
from stoker.server.settings import EngineSettings
from tests.helpers import DEMO_DATA, LIMITS, dealer

JOB = JobSpec("demo", pipeline="train", image_size=32, batch_size=4, seed=7)
RECEIVE_TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    catalog = Catalog.load([DatasetDecl("demo", DEMO_DATA)])
    config = EngineSettings(bind="tcp://127.0.0.1:0", workers=1, max_prefetch=4, max_shm_mb=64)
    with Engine(config, catalog, BUILTIN_PIPELINES) as running:
        yield running


@pytest.fixture
def client(engine: Engine) -> Iterator[zmq.Socket]:
    with dealer(engine.endpoint, RECEIVE_TIMEOUT_MS) as socket:
        yield socket


def request(socket: zmq.Socket, k: int, job: JobSpec = JOB, name: str = "unit") -> None:
    fields = {"job": job.to_wire(), "epoch": 0, "rank": 0, "k": k, "client": name}
    socket.send(encode(Kind.REQUEST, fields))


def receive(socket: zmq.Socket) -> tuple[Header, list[bytes]]:
    head, *payload = socket.recv_multipart()
    return decode(head), payload


def test_hello_is_answered_with_the_job_and_a_granted_window(engine, client) -> None:
    client.send(encode(Kind.HELLO, {"job": JOB.to_wire(), "client": "unit", "prefetch": 64}))
    header, _ = receive(client)
    assert header.kind is Kind.JOB_INFO
    info = header.fields
    assert (info["samples"], info["batches"], info["image_shape"]) == (48, 12, [32, 32, 3])
    assert info["prefetch"] == 4, "the window is capped at the server's max_prefetch"


def test_a_batch_holds_exactly_the_bytes_of_rendering_its_samples(engine, client) -> None:
    request(client, 3)
    header, payload = receive(client)
    assert header.kind is Kind.BATCH and header.fields["k"] == 3
    images = np.frombuffer(b"".join(payload), np.uint8).reshape(header.fields["shape"])
    table = engine.catalog["demo"]
    for row, index in enumerate(header.fields["indices"]):
        expected = np.zeros((32, 32, 3), np.uint8)
        key = sample_seed(JOB.seed, 0, index)
        render_sample(
            table.locator(index).target.encode(),
            key,
            BUILTIN_PIPELINES["train"],
            32,
            expected,
            LIMITS,
            StageTimes(),
        )
        assert np.array_equal(images[row], expected), row
        assert header.fields["labels"][row] == int(table.labels[index])


def test_errors_name_the_batch_they_are_about(engine, client) -> None:
    request(client, 99)
    header, _ = receive(client)
    assert header.kind is Kind.ERROR and header.fields["code"] == ErrorCode.OUT_OF_RANGE
    assert (header.fields["epoch"], header.fields["rank"], header.fields["k"]) == (0, 0, 99)
    request(client, 0, job=JobSpec("nope", image_size=32, batch_size=4))
    header, _ = receive(client)
    assert header.fields["code"] == ErrorCode.UNKNOWN_DATASET and "['demo']" in header.fields["message"]


def test_a_flooding_client_is_told_busy_with_when_to_retry_and_its_window(engine, client) -> None:
    name = uuid.uuid4().hex
    fresh = JobSpec("demo", image_size=32, batch_size=4, seed=1234)  # nothing of it cached yet
    for k in range(10):  # a window of 4, 4 parked, 2 refused
        request(client, k, job=fresh, name=name)
    busy, batches = [], []
    while len(batches) < 8 or len(busy) < 2:
        header, _ = receive(client)
        (busy if header.kind is Kind.ERROR else batches).append(header.fields)
    assert [b["k"] for b in busy] == [8, 9] and all(b["code"] == ErrorCode.BUSY for b in busy)
    assert all(b["prefetch"] == 4 and 0.01 <= b["retry_after_s"] <= 1.0 for b in busy)
    assert sorted(b["k"] for b in batches) == list(range(8))


def test_an_internal_failure_is_an_internal_error_about_the_request(engine, client, monkeypatch) -> None:
    monkeypatch.setenv(failpoints.ENVIRONMENT_VARIABLE, "engine.request")
    failpoints.armed.cache_clear()
    try:
        request(client, 1)
        header, _ = receive(client)
    finally:
        monkeypatch.delenv(failpoints.ENVIRONMENT_VARIABLE)
        failpoints.armed.cache_clear()
    assert header.kind is Kind.ERROR and header.fields["code"] == ErrorCode.INTERNAL
    assert "InjectedFault" in header.fields["message"]
    assert (header.fields["epoch"], header.fields["rank"], header.fields["k"]) == (0, 0, 1)
    request(client, 1)  # disarmed, the same request is served
    assert receive(client)[0].kind is Kind.BATCH


def test_the_status_and_live_changes_go_through_the_engine_thread(engine, client) -> None:
    request(client, 0)
    receive(client)
    status = engine.call(build_status, engine).result(timeout=10)
    assert status.ready and status.endpoints.data == engine.endpoint
    assert status.pool.size == 1 and status.pool.problem is None and status.datasets[0].samples == 48
    assert any(c.client_id == "unit" for c in status.clients)
    assert status.config.client_timeout_s == engine.config.client_timeout_s
    changed = engine.call(functools.partial(engine.reconfigure, cache_batches=2, client_timeout_s=30.0)).result(10)
    assert (changed.cache_batches, changed.client_timeout_s) == (2, 30.0)
    with pytest.raises(ValueError, match="bind"):
        engine.call(functools.partial(engine.reconfigure, bind="tcp://127.0.0.1:1")).result(timeout=10)
