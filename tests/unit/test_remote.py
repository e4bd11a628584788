"""``RemoteBatches`` as its parts compose it (connection, feed, position, checkpoint, output, stats),
driven in-process against a scripted server that plans its batches with the real planner: every
image is filled with its dataset index, so order, coverage and conversion can be read off the bytes."""

from __future__ import annotations

from itertools import islice
from typing import Any

import numpy as np
import torch

from stoker.client import RemoteBatches
from stoker.client.protocol.job import JobSpec
from stoker.client.protocol.plan import batch_indices, permutation
from stoker.client.protocol.wire import Kind, encode
from tests.helpers import wait_until
from tests.unit.test_stream import JOB_INFO, SPEC, WAIT_S, Message, ScriptedServer, scripted

SAMPLES = JOB_INFO["samples"]
BATCHES = JOB_INFO["batches"]
IMAGE = (2, 2, 3)


def planned(fields: dict[str, Any]) -> list[Message]:
    """The ``BATCH`` a real server would plan for the request ``fields`` (its job may carry a span)."""
    job = JobSpec.from_wire(fields["job"])
    order = permutation(SAMPLES, job.seed, fields["epoch"], job.shuffle)
    indices = batch_indices(order, job.batch_size, job.world_size, job.drop_last, fields["rank"], fields["k"], job.span)
    header = {
        "job_id": job.job_id,
        "epoch": fields["epoch"],
        "rank": fields["rank"],
        "k": fields["k"],
        "dtype": "uint8",
        "shape": [len(indices), *(IMAGE if job.layout == "nhwc" else (IMAGE[2], *IMAGE[:2]))],
        "labels": [int(i) % 2 for i in indices],
        "indices": indices.tolist(),
    }
    pixels = np.repeat(indices.astype(np.uint8), int(np.prod(IMAGE)))
    return [[encode(Kind.BATCH, header), pixels.tobytes()]]


def client(server: ScriptedServer, **overrides: Any) -> RemoteBatches:
    options = {
        "image_size": SPEC.image_size,
        "batch_size": SPEC.batch_size,
        "shuffle": SPEC.shuffle,
        "world_size": 1,
        "rank": 0,
        "device": "cpu",
        "normalize": False,
        "return_indices": True,
        "timeout_s": WAIT_S,
    }
    return RemoteBatches(server.endpoint, SPEC.dataset, **(options | overrides))


def indices_of(batches: list[tuple[Any, ...]]) -> list[int]:
    """The dataset indices of ``batches``, checked against their pixels and labels."""
    seen: list[int] = []
    for images, labels, indices in batches:
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 2, 2) and images.is_contiguous()
        assert torch.equal(images.flatten(1).min(1).values, indices.to(torch.uint8))
        assert torch.equal(images.flatten(1).max(1).values, indices.to(torch.uint8))
        assert torch.equal(labels, indices % 2)
        seen += indices.tolist()
    return seen


def epochs_asked(server: ScriptedServer, epoch: int) -> list[int]:
    return [f["k"] for f in server.requests() if f["epoch"] == epoch]


def test_epochs_flow_in_order_with_the_next_one_asked_ahead_once() -> None:
    with scripted(planned) as server, client(server) as batches:
        assert len(batches) == BATCHES and batches.classes == ("a", "b")
        first = list(batches)
        assert indices_of(first) == list(range(SAMPLES))
        assert batches.epoch == 1
        # The next epoch was asked for while this one ran, as far as the window allows.
        wait_until(lambda: epochs_asked(server, 1) == [0, 1, 2, 3], WAIT_S, what="epoch 1 asked ahead")
        second = list(batches)
        assert indices_of(second) == list(range(SAMPLES))
        assert epochs_asked(server, 1) == list(range(BATCHES)), "each batch asked once: the stream was kept"
        wait_until(lambda: epochs_asked(server, 2)[:1] == [0], WAIT_S, what="one epoch planned ahead again")
        stats = batches.stats()
        assert (stats["batches"], stats["images"], stats["bytes"]) == (16, 32, 32 * int(np.prod(IMAGE)))
        assert 0 <= stats["wait_s"] <= stats["elapsed_s"] and 0 <= stats["wait_share"] <= 1


def test_a_partial_epoch_saves_its_next_batch_and_taking_len_batches_finishes_it() -> None:
    with scripted(planned) as server, client(server) as batches:
        taken = list(islice(batches, 3))
        assert batches.state_dict()["next_batch"] == 3
        rest = list(islice(batches, len(batches) - 3))  # never resumes the iterator after the last batch
        assert indices_of(taken + rest) == list(range(SAMPLES))
        assert (batches.epoch, batches.state_dict()["next_batch"]) == (1, 0)


def test_a_state_saved_on_two_ranks_resumes_on_one_with_exactly_the_rest_of_its_epoch() -> None:
    # Two ranks took two batches of two each: positions 0-7 of epoch 0 are served.
    saved = {"version": 1, "job": {**SPEC.to_wire(), "world_size": 2}, "rank": 1, "epoch": 0, "next_batch": 2}
    with scripted(planned) as server, client(server) as batches:
        batches.load_state_dict(saved)
        assert len(batches) == 4, "the re-plan waited for the server's dataset size"
        rest = {"version": 2, "job": SPEC.to_wire(), "rank": 0, "epoch": 0, "next_batch": 0, "span": [8, 16]}
        assert batches.state_dict() == rest
        assert indices_of(list(batches)) == list(range(8, 16))
        assert {tuple(f["job"]["span"]) for f in server.requests() if f["epoch"] == 0} == {(8, 16)}
        assert batches.state_dict() == {"version": 1, "job": SPEC.to_wire(), "rank": 0, "epoch": 1, "next_batch": 0}
        assert indices_of(list(batches)) == list(range(SAMPLES)), "the next epoch is whole"
        batches.load_state_dict(saved)  # connected: planned at once, no server needed for it
        assert batches.state_dict() == rest


def test_dataloader_workers_each_take_their_share_in_order() -> None:
    with scripted(planned) as server, client(server) as batches:
        assert len(batches) == BATCHES  # the parent is connected: each forked worker connects afresh
        loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=2, timeout=WAIT_S)
        assert indices_of(list(loader)) == list(range(SAMPLES))
        assert sorted(epochs_asked(server, 0)) == list(range(BATCHES)), "each batch asked by one worker only"
