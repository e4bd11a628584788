"""The checkpoint format: what ``state_dict()`` writes, and which saved states load (versions 1 and 2,
as older clients wrote them) or are refused with a clear error. No server: nothing here connects."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from stoker.client import ProtocolError, RemoteBatches
from stoker.client.protocol.job import JobSpec
from stoker.client.runtime.checkpoint import read_state, read_states, state_dict
from stoker.client.runtime.position import SavedPosition

NOWHERE = "tcp://127.0.0.1:1"
JOB = {
    "dataset": "demo",
    "pipeline": "train",
    "image_size": 224,
    "batch_size": 64,
    "seed": 0,
    "shuffle": True,
    "drop_last": False,
    "world_size": 2,
}
VERSION_1 = {"version": 1, "job": JOB, "rank": 1, "epoch": 3, "next_batch": 120}
"""A state as every client since the first writes it."""
VERSION_2 = {"version": 2, "job": JOB, "rank": 0, "epoch": 3, "next_batch": 7, "span": [1000, 5000]}
"""A state inside an epoch that was itself resumed on another number of ranks."""
SPEC = JobSpec.from_wire(JOB)


def client(**overrides: Any) -> RemoteBatches:
    return RemoteBatches(NOWHERE, "demo", **({"world_size": 2, "rank": 1, "device": "cpu"} | overrides))


def test_a_fresh_client_writes_a_version_1_state() -> None:
    assert client().state_dict() == {**VERSION_1, "epoch": 0, "next_batch": 0}


def test_a_version_1_state_loads_and_is_written_back_unchanged() -> None:
    batches = client()
    batches.load_state_dict(VERSION_1)
    assert batches.epoch == 3
    assert batches.state_dict() == VERSION_1


def test_a_version_2_state_loads_on_as_many_ranks_and_keeps_its_span() -> None:
    batches = client(rank=0)
    batches.load_state_dict(VERSION_2)
    assert batches.state_dict() == VERSION_2


def test_a_state_survives_json_and_numpy_integers() -> None:
    """JSON turns the span into a list (it already is one); numpy integers loaded before, so they still do."""
    batches = client(rank=0)
    batches.load_state_dict(json.loads(json.dumps(VERSION_2)))
    assert batches.state_dict() == VERSION_2
    batches.load_state_dict({**VERSION_1, "epoch": np.int64(4), "next_batch": np.int32(2)})
    assert (batches.state_dict()["epoch"], batches.state_dict()["next_batch"]) == (4, 2)


def test_writing_a_position_with_and_without_a_span() -> None:
    assert state_dict(SPEC, 1, SavedPosition(3, 120, None, 2)) == VERSION_1
    assert state_dict(SPEC, 0, SavedPosition(3, 7, (1000, 5000), 2)) == VERSION_2
    assert read_state(VERSION_2, SPEC) == SavedPosition(3, 7, (1000, 5000), 2)


def test_any_world_size_may_read_a_state_but_not_another_job() -> None:
    assert read_state(VERSION_1, JobSpec("demo", world_size=7)) == SavedPosition(3, 120, None, 2)
    with pytest.raises(ValueError, match="another job.*batch_size.*64, 32"):
        read_state(VERSION_1, JobSpec("demo", batch_size=32))
    with pytest.raises(ValueError, match="another job.*dataset"):
        read_state(VERSION_1, JobSpec("other"))
    with pytest.raises(ProtocolError, match="unknown job fields"):
        read_state({**VERSION_1, "job": {**JOB, "colour": "red"}}, SPEC)


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({**VERSION_1, "version": 3}, "version 3 is not one of 1, 2"),
        ({k: v for k, v in VERSION_1.items() if k != "version"}, r"lacks \['version'\]"),
        ({k: v for k, v in VERSION_1.items() if k not in ("epoch", "next_batch")}, "lacks.*epoch.*next_batch"),
        ({**VERSION_1, "job": "demo"}, "not a job spec"),
        ({**VERSION_1, "epoch": -1}, "bad state: epoch=-1"),
        ({**VERSION_1, "next_batch": "soon"}, "bad state"),
        ({**VERSION_1, "next_batch": None}, "bad state"),
        ({**VERSION_2, "span": [5, 5]}, "bad state.*span"),
        ({**VERSION_2, "span": [1, 2, 3]}, "bad state.*span"),
        ({**VERSION_2, "span": 12}, "bad state.*span"),
        ([VERSION_1], "a state is a dict"),
    ],
)
def test_a_bad_state_is_refused_with_what_is_wrong(state: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        read_state(state, SPEC)


def test_a_refused_state_leaves_the_client_where_it_was() -> None:
    batches = client()
    batches.load_state_dict(VERSION_1)
    with pytest.raises(ValueError):
        batches.load_state_dict({**VERSION_1, "epoch": 9, "version": 9})
    assert batches.state_dict() == VERSION_1


def test_every_ranks_states_must_agree_and_name_each_rank_once() -> None:
    rank0, rank1 = {**VERSION_1, "rank": 0}, VERSION_1
    assert read_states([rank0, rank1], SPEC) == read_states(rank1, SPEC) == SavedPosition(3, 120, None, 2)
    with pytest.raises(ValueError, match="disagree"):
        read_states([rank0, {**rank1, "next_batch": 121}], SPEC)
    with pytest.raises(ValueError, match="rank 1 twice"):
        read_states([rank1, rank1], SPEC)
    with pytest.raises(ValueError, match="no state"):
        read_states([], SPEC)
