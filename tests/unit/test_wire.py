"""The wire format: round trips, and typed refusals of everything malformed."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stoker.client.protocol.errors import ProtocolError
from stoker.client.protocol.wire import (
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    ErrorCode,
    Kind,
    decode,
    decode_targets,
    encode,
)

V = PROTOCOL_VERSION

JOB = {
    "dataset": "demo",
    "pipeline": "train",
    "image_size": 224,
    "batch_size": 8,
    "seed": 0,
    "shuffle": True,
    "drop_last": False,
    "world_size": 1,
}
SAMPLES = {
    Kind.HELLO: {"job": JOB, "client": "c1", "rank": 0, "prefetch": 4},
    Kind.JOB_INFO: {
        "job_id": "ab",
        "samples": 10,
        "classes": ["a"],
        "batches": 2,
        "image_shape": [8, 8, 3],
        "fingerprint": "f",
        "prefetch": 4,
        "server": "0.1.0",
    },
    Kind.REQUEST: {"job": JOB, "epoch": 0, "rank": 0, "k": 3, "client": "c1", "waited_s": 0.5, "elapsed_s": 2},
    Kind.BATCH: {
        "job_id": "ab",
        "epoch": 1,
        "rank": 0,
        "k": 2,
        "dtype": "uint8",
        "shape": [2, 8, 8, 3],
        "labels": [0, 1],
        "indices": [5, 7],
    },
    Kind.ERROR: {"code": int(ErrorCode.BUSY), "message": "later", "retry_after_s": 0.1},
    Kind.BYE: {"client": "c1"},
}


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_round_trips(kind: Kind) -> None:
    header = decode(encode(kind, SAMPLES[kind]))
    assert header.kind is kind
    assert header.fields == SAMPLES[kind]


def test_literal_examples_in_the_docs_decode() -> None:
    doc = (Path(__file__).resolve().parents[2] / "client" / "protocol" / "WIRE.md").read_text()
    blocks = re.findall(r"```hex\n(.*?)```", doc, re.S)
    with_targets, request, batch = (decode(bytes.fromhex(block.replace("\n", " "))) for block in blocks)
    assert request.kind is Kind.REQUEST and request.fields["k"] == 3
    assert request.fields["job"]["dataset"] == "demo"
    assert batch.kind is Kind.BATCH and batch.fields["shape"] == [2, 224, 224, 3]
    assert batch.fields["labels"] == [4, 1] and batch.fields["indices"] == [17, 42]
    assert with_targets.fields["targets"] == ["caption", "boxes", "mask"] and with_targets.fields["mask"] == [2, 64, 64]
    (frame,) = re.findall(r"```targets-hex\n(.*?)```", doc, re.S)
    targets = decode_targets(bytes.fromhex(frame.replace("\n", " ")), 2)
    assert targets["caption"] == ["a dog", "two cats"]
    assert np.frombuffer(targets["boxes"][0], "<f4").tolist() == [4, 8, 30, 40] and targets["boxes"][1] == b""
    assert np.frombuffer(targets["box_labels"][0], "<i8").tolist() == [18]


def test_a_targets_frame_that_does_not_match_its_batch_is_refused() -> None:
    with pytest.raises(ProtocolError, match="list of 2"):
        decode_targets(msgpack.packb({"caption": ["only one"]}), 2)
    with pytest.raises(ProtocolError, match="msgpack"):
        decode_targets(b"\xc1", 2)


def test_wrong_version_is_its_own_error_code() -> None:
    frame = msgpack.packb(["stoker", PROTOCOL_VERSION + 1, int(Kind.BYE), {"client": "x"}])
    with pytest.raises(ProtocolError) as info:
        decode(frame)
    assert info.value.code == ErrorCode.UNSUPPORTED_VERSION
    assert "version" in str(info.value)


@pytest.mark.parametrize(
    ("frame", "needle"),
    [
        (b"", "msgpack"),
        (b"\xc1garbage", "msgpack"),
        (msgpack.packb({"a": 1}), "4-element"),
        (msgpack.packb(["other", 1, 1, {}]), "magic"),
        (msgpack.packb(["stoker", V, 99, {}]), "unknown message kind"),
        (msgpack.packb(["stoker", V, True, {}]), "unknown message kind"),
        (msgpack.packb(["stoker", V, 6, []]), "map"),
        (msgpack.packb(["stoker", V, 6, {}]), "lacks the field 'client'"),
        (msgpack.packb(["stoker", V, 6, {"client": 5}]), "must be str"),
        (msgpack.packb(["stoker", V, 3, {**SAMPLES[Kind.REQUEST], "k": True}]), "must be int"),
        (msgpack.packb(["stoker", V, 3, {**SAMPLES[Kind.REQUEST], "waited_s": float("nan")}]), "must be float"),
        (msgpack.packb(["stoker", V, 4, {**SAMPLES[Kind.BATCH], "labels": [1, "x"]}]), "must be ints"),
        (msgpack.packb(["stoker", V, 6, {"client": "x"}]) + b"trailing", "msgpack"),
    ],
)
def test_malformed_headers_are_protocol_errors(frame: bytes, needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle) as info:
        decode(frame)
    assert info.value.code == ErrorCode.BAD_MESSAGE


def test_oversized_header_is_refused_before_parsing() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(b"\x00" * (MAX_HEADER_BYTES + 1))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_decoder_never_fails_untyped_on_random_bytes(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode(data)


json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from([int(k) for k in Kind] + [0, 7, 255]),
    json_like,
    st.sampled_from(["stoker", "x"]),
    st.sampled_from([PROTOCOL_VERSION, 0, 2]),
)
def test_decoder_never_fails_untyped_on_structured_garbage(kind: int, fields: object, magic: str, version: int) -> None:
    frame = msgpack.packb([magic, version, kind, fields], use_bin_type=True)
    try:
        header = decode(frame)
    except ProtocolError:
        return
    assert header.kind == kind and isinstance(header.fields, dict)


def test_payload_parts_are_whole_samples_within_the_frame_limit() -> None:
    from stoker.client.protocol.wire import MAX_PART_BYTES, payload_parts

    sample = 224 * 224 * 3
    parts = payload_parts(256 * sample, sample)
    assert sum(length for _, length in parts) == 256 * sample
    assert all(length <= MAX_PART_BYTES and length % sample == 0 for _, length in parts)
    assert [offset for offset, _ in parts] == [sum(length for _, length in parts[:i]) for i in range(len(parts))]
    assert payload_parts(10 * sample, sample) == [(0, 10 * sample)]
    huge = MAX_PART_BYTES * 2  # a single sample larger than the limit still travels whole
    assert payload_parts(3 * huge, huge) == [(0, huge), (huge, huge), (2 * huge, huge)]
