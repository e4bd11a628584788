"""Several loader servers behind one job: requests spread over all of them, same bytes, exactly once,
whichever server dies, and servers joining mid-epoch get work."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from tests.helpers import BackgroundClient, Batch, fetch_epoch, metrics, wait_until

pytestmark = pytest.mark.slow

T = TypeVar("T")
# Two ranks of one job, unless a test says otherwise (on top of the tests' CLIENT_OPTIONS).
OPTIONS = dict(image_size=48, seed=21, world_size=2)


def epoch_of(endpoints: str | Sequence[str], rank: int, **extra) -> list[Batch]:
    return fetch_epoch(endpoints, rank=rank, **(OPTIONS | extra))


def served(server) -> float:
    return metrics(server.http).get("stoker_batches_served_total", 0.0)


def same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[0], y[0]) and torch.equal(x[2], y[2]) for x, y in zip(a, b, strict=True)
    )


def delivered(batches) -> list[int]:
    """The sample indices in ``batches``, sorted: ``list(range(48))`` when an epoch came exactly once."""
    return sorted(int(i) for _, _, idx in batches for i in idx)


def epoch_with_pause(endpoints, during: Callable[[], T], **options) -> tuple[list[Batch], T]:
    """Rank 0's epoch streamed in a thread that pauses after its second batch while ``during`` runs
    (a server killed, started, or moved in DNS); returns the epoch's batches and what ``during`` gave.
    ``options`` go to the :class:`BackgroundClient` (``step_s``, a training step) or the client."""
    with BackgroundClient(endpoints, pause_at={2}, keep_batches=True, rank=0, **(OPTIONS | options)) as client:
        client.wait_paused()
        outcome = during()
        client.release()
        client.result()
    (batches,) = client.batches
    return batches, outcome


def test_two_ranks_draw_an_epoch_from_three_servers(cluster) -> None:
    servers = [cluster.start(workers=1) for _ in range(3)]
    endpoints = [s.data for s in servers]
    per_rank = [epoch_of(endpoints, rank) for rank in range(2)]
    assert delivered(batch for batches in per_rank for batch in batches) == list(range(48))
    assert all(served(s) > 0 for s in servers), "every server got requests"
    reference = [epoch_of(servers[0].data, rank) for rank in range(2)]
    assert all(same(a, b) for a, b in zip(per_rank, reference, strict=True)), "same bytes as from a single server"


def test_an_epoch_survives_a_server_killed_mid_epoch(cluster) -> None:
    servers = [cluster.start(workers=1) for _ in range(3)]
    reference = epoch_of(servers[2].data, 0)
    batches, _ = epoch_with_pause([s.data for s in servers], lambda: cluster.kill(servers[0]))
    assert same(batches, reference), "exactly once, identical to a single-server run"


def test_a_server_started_mid_epoch_receives_requests(cluster, tmp_path: Path) -> None:
    first = cluster.start(workers=1)
    late_endpoint = f"ipc://{tmp_path / 'late.ipc'}"  # an address known before the server exists
    # The client greets the newcomer within a second and spreads requests to it.
    batches, late = epoch_with_pause(
        [first.data, late_endpoint],
        lambda: cluster.start(workers=1, bind=late_endpoint),
        step_s=0.05,
        world_size=1,
        batch_size=1,
        prefetch=2,
    )
    assert delivered(batches) == list(range(48))
    assert served(late) > 0, "the server that joined mid-epoch got requests"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return len({info[4][0] for info in socket.getaddrinfo("localhost", 1, type=socket.SOCK_STREAM)}) > 1
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="needs 'localhost' to resolve to both 127.0.0.1 and ::1")
def test_dns_endpoint_uses_every_address_of_the_name(cluster) -> None:
    v4 = cluster.start(workers=1, bind="tcp://127.0.0.1:0")
    port = v4.data.rsplit(":", 1)[1]
    v6 = cluster.start(workers=1, bind=f"tcp://[::1]:{port}")
    batches = epoch_of(f"dns+tcp://localhost:{port}", 0, world_size=1, batch_size=2)
    assert delivered(batches) == list(range(48))
    wait_until(lambda: served(v4) > 0 and served(v6) > 0, what="both addresses of localhost to serve")


def _second_loopback_address() -> bool:
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.2", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _second_loopback_address(), reason="needs 127.0.0.2 on the loopback interface")
def test_dns_answer_changing_mid_epoch_moves_the_client_to_the_new_server(cluster, monkeypatch, caplog) -> None:
    """A ``dns+tcp://`` name whose answer changes from one loader to another while an epoch streams
    (a rolling replacement): the client connects to the new address, drops the old one and the epoch
    still comes out exactly once. The name is answered by a stand-in for the DNS server, the only
    part that is not real here."""
    old = cluster.start(workers=1, bind="tcp://127.0.0.1:0")
    port = int(old.data.rsplit(":", 1)[1])
    new = cluster.start(workers=1, bind=f"tcp://127.0.0.2:{port}")  # all of 127/8 is loopback on Linux
    answer = ["127.0.0.1"]
    real_getaddrinfo = socket.getaddrinfo

    def dns(host, *args, **kwargs):
        if host != "loaders.stoker.test":
            return real_getaddrinfo(host, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in answer]

    def move_the_name() -> None:  # as a rolling replacement would
        answer[:] = ["127.0.0.2"]

    monkeypatch.setattr(socket, "getaddrinfo", dns)
    with caplog.at_level(logging.INFO, logger="stoker.client.runtime.session"):
        batches, _ = epoch_with_pause(
            f"dns+tcp://loaders.stoker.test:{port}",
            move_the_name,
            step_s=0.02,
            world_size=1,
            batch_size=1,
            prefetch=2,
            resolve_interval_s=0.2,
        )
    assert delivered(batches) == list(range(48))
    assert served(new) > 0, "the address the name now points at got requests"
    messages = [record.getMessage() for record in caplog.records]
    assert f"server tcp://127.0.0.1:{port} removed (no longer in DNS)" in messages, messages
    assert f"server tcp://127.0.0.2:{port} added" in messages, messages
