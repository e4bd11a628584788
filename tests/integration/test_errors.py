"""Typed errors instead of hangs: unknown dataset or pipeline, bad parameters, no server."""

from __future__ import annotations

import socket
import time

import pytest

from stoker.client import InvalidJobError, RemoteBatches, ServerError, StokerTimeoutError, UnknownDatasetError
from stoker.client.protocol.wire import ErrorCode
from tests.helpers import http_json


def test_unknown_dataset_names_what_exists(cluster) -> None:
    server = cluster.start()
    with RemoteBatches(server.data, "imagenet", device="cpu", timeout_s=30) as batches:
        with pytest.raises(UnknownDatasetError, match=r"unknown dataset 'imagenet'.*\['demo'\]"):
            len(batches)


def test_unknown_pipeline_names_what_exists(cluster) -> None:
    server = cluster.start()
    with RemoteBatches(server.data, "demo", pipeline="mixup", device="cpu", timeout_s=30) as batches:
        with pytest.raises(UnknownDatasetError, match=r"unknown pipeline 'mixup'.*'eval'.*'train'"):
            next(iter(batches))


def test_out_of_range_parameters_are_invalid_job_errors(cluster) -> None:
    server = cluster.start()
    with RemoteBatches(server.data, "demo", image_size=2048, device="cpu", timeout_s=30) as batches:
        with pytest.raises(InvalidJobError, match="image_size=2048 exceeds"):
            len(batches)
    with RemoteBatches(
        server.data, "demo", batch_size=40, drop_last=True, world_size=2, rank=0, device="cpu", timeout_s=30
    ) as batches:
        with pytest.raises(InvalidJobError, match="leaves no batch"):
            len(batches)


def test_bad_client_arguments_fail_before_connecting() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        RemoteBatches("tcp://127.0.0.1:1", "demo", batch_size=0)
    with pytest.raises(ValueError, match="rank=3"):
        RemoteBatches("tcp://127.0.0.1:1", "demo", rank=3, world_size=2)


def test_unreachable_server_times_out_with_a_typed_error() -> None:
    with socket.socket() as probe:  # a port nobody listens on: bound, never listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        started = time.monotonic()
        with RemoteBatches(f"tcp://127.0.0.1:{port}", "demo", device="cpu", timeout_s=1.5) as batches:
            with pytest.raises(StokerTimeoutError, match="timeout_s=1.5"):
                len(batches)
        assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    ("point", "evidence"),
    [
        ("worker.sample", ("sample ", "demo-data", "server traceback:", "InjectedFault", "run_task")),
        ("engine.request", ("InjectedFault", "while producing batch ", "of epoch 0")),
    ],
)
def test_an_internal_failure_is_a_typed_error_within_seconds_not_a_timeout(cluster, point, evidence) -> None:
    server = cluster.start(env={"STOKER_FAILPOINTS": point})
    started = time.monotonic()
    with RemoteBatches(server.data, "demo", batch_size=4, image_size=32, device="cpu", timeout_s=60) as batches:
        with pytest.raises(ServerError) as info:
            next(iter(batches))
    assert time.monotonic() - started < 20, "raised well before timeout_s=60"
    error = info.value
    assert error.code == ErrorCode.INTERNAL and not isinstance(error, StokerTimeoutError)
    notes = "\n".join(getattr(error, "__notes__", []))
    for needle in evidence:
        assert needle in notes or needle in str(error), (needle, str(error), notes)
    status = http_json(server.http + "/status")[1]
    assert status["errors"]["INTERNAL"] >= 4, "asked again three times before raising"
    assert status["bad_samples"]["count"] == 0, "a failure that is not the file's is not a bad sample"
