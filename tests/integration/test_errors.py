"""Typed errors instead of hangs: unknown dataset or pipeline, bad parameters, internal failures.
(Bad arguments and an unreachable server, which need no server, are in tests/unit/test_client_arguments.py.)"""

from __future__ import annotations

import time

import pytest

from stoker.client import InvalidJobError, ServerError, StokerTimeoutError, UnknownDatasetError
from stoker.client.protocol.wire import ErrorCode
from tests.helpers import http_json, open_client

pytestmark = pytest.mark.slow


def test_unknown_dataset_names_what_exists(cluster) -> None:
    server = cluster.start()
    with open_client(server.data, "imagenet", timeout_s=30) as batches:
        with pytest.raises(UnknownDatasetError, match=r"unknown dataset 'imagenet'.*\['demo'\]"):
            len(batches)


def test_unknown_pipeline_names_what_exists(cluster) -> None:
    server = cluster.start()
    with open_client(server.data, pipeline="mixup", timeout_s=30) as batches:
        with pytest.raises(UnknownDatasetError, match=r"unknown pipeline 'mixup'.*'eval'.*'train'"):
            next(iter(batches))


def test_out_of_range_parameters_are_invalid_job_errors(cluster) -> None:
    server = cluster.start()
    with open_client(server.data, image_size=2048, timeout_s=30) as batches:
        with pytest.raises(InvalidJobError, match="image_size=2048 exceeds"):
            len(batches)
    with open_client(server.data, batch_size=40, drop_last=True, world_size=2, rank=0, timeout_s=30) as batches:
        with pytest.raises(InvalidJobError, match="leaves no batch"):
            len(batches)


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
    with open_client(server.data, batch_size=4, image_size=32, timeout_s=60) as batches:
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
