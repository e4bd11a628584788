"""Job specs: validation that names the field, a stable id, strict wire parsing."""

from __future__ import annotations

import pytest

from stoker.client.protocol.errors import ProtocolError
from stoker.client.protocol.job import JobSpec
from stoker.client.protocol.wire import ErrorCode


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"dataset": ""}, "dataset="),
        ({"dataset": "../etc"}, "dataset="),
        ({"dataset": "d", "pipeline": "a b"}, "pipeline="),
        ({"dataset": "d", "batch_size": 0}, "batch_size="),
        ({"dataset": "d", "image_size": 5000}, "image_size="),
        ({"dataset": "d", "world_size": 0}, "world_size="),
        ({"dataset": "d", "seed": -1}, "seed="),
        ({"dataset": "d", "shuffle": 1}, "shuffle="),
        ({"dataset": "d", "batch_size": True}, "batch_size="),
    ],
)
def test_invalid_specs_name_the_field(fields: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        JobSpec(**fields)


def test_job_id_is_stable_and_sensitive_to_every_field() -> None:
    base = JobSpec("demo")
    assert base.job_id == JobSpec("demo").job_id
    assert base.job_id == "733d6fc5ddf8f1b6"
    for change in ({"seed": 1}, {"batch_size": 63}, {"pipeline": "eval"}, {"drop_last": True}, {"world_size": 2}):
        assert JobSpec(**{**base.to_wire(), **change}).job_id != base.job_id


def test_from_wire_refuses_unknown_and_bad_fields() -> None:
    with pytest.raises(ProtocolError, match="unknown job fields") as info:
        JobSpec.from_wire({"dataset": "d", "color_jitter": 0.4})
    assert info.value.code == ErrorCode.INVALID_JOB
    with pytest.raises(ProtocolError, match="invalid job") as info:
        JobSpec.from_wire({"pipeline": "train"})
    assert info.value.code == ErrorCode.INVALID_JOB
    assert JobSpec.from_wire(JobSpec("d").to_wire()) == JobSpec("d")


def test_a_span_is_part_of_the_job_only_when_given() -> None:
    from dataclasses import replace

    spec = JobSpec("demo")
    spanned = replace(spec, span=(3, 10))
    assert "span" not in spec.to_wire(), "jobs without a span keep their wire form and id"
    assert spanned.to_wire()["span"] == [3, 10] and spanned.job_id != spec.job_id
    assert JobSpec.from_wire(spanned.to_wire()) == spanned
    for bad in ((5, 5), (-1, 3), (3,), (1, True)):
        with pytest.raises(ValueError, match="span"):
            replace(spec, span=bad)
