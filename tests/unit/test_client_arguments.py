"""The client refuses bad arguments before it sends anything, and a server that never answers is a
typed timeout: no server process needed (an address nobody listens on is enough)."""

from __future__ import annotations

import socket
import time

import pytest

from stoker.client import RemoteBatches, StokerTimeoutError
from tests.helpers import open_client


def test_malformed_endpoints_are_refused_up_front() -> None:
    for bad in ("localhost:5555", "dns+tcp://nameonly", "http://x:1", ""):
        with pytest.raises(ValueError, match="endpoint"):
            RemoteBatches(bad, "demo")


def test_client_side_names_are_validated_before_sending() -> None:
    with pytest.raises(ValueError, match="dataset="):
        RemoteBatches("tcp://127.0.0.1:1", "../../etc/passwd")
    with pytest.raises(ValueError, match="pipeline="):
        RemoteBatches("tcp://127.0.0.1:1", "demo", pipeline="/bin/sh")


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
        with open_client(f"tcp://127.0.0.1:{port}", timeout_s=1.5) as batches:
            with pytest.raises(StokerTimeoutError, match="timeout_s=1.5"):
                len(batches)
        assert time.monotonic() - started < 10
