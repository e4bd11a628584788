"""The stoker wire format, shared by server and client (documented with an example in WIRE.md).

Every message is a ZeroMQ multipart message whose first frame is a msgpack header
``["stoker", version, kind, {fields}]``; a ``BATCH`` carries the image bytes in further raw frames
(whole samples, at most ``MAX_PART_BYTES`` each) so neither side copies them into or out of msgpack.
Decoding never trusts the peer: sizes, types and kinds are checked and any violation is a
:class:`ProtocolError` carrying the :class:`ErrorCode` to answer with.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

import msgpack

from stoker.client.protocol.errors import ProtocolError

__all__ = [
    "MAGIC",
    "PROTOCOL_VERSION",
    "MAX_HEADER_BYTES",
    "Kind",
    "ErrorCode",
    "Header",
    "encode",
    "decode",
    "batch_nbytes",
    "payload_parts",
    "view_blocks",
    "MAX_PART_BYTES",
    "MAX_TARGETS_BYTES",
    "box_labels_name",
    "decode_targets",
]

MAGIC: Final = "stoker"
PROTOCOL_VERSION: Final = 2
# Version 2 added the BATCH frames after the images (a mask block, the targets frame): a version-1
# client would read them as image bytes, so the versions refuse each other with UNSUPPORTED_VERSION.
# A header holds a job spec and at most a few thousand labels; anything bigger is hostile or broken.
MAX_HEADER_BYTES: Final = 256 * 1024
MAX_BATCH_SAMPLES: Final = 16384
# Image bytes travel in frames of at most this size (whole samples each). glibc serves allocations
# up to 32 MiB from its reusable heap but maps larger ones fresh, so one 38 MB frame per batch would
# cost the receiver a page fault per 4 KiB: 1.4 GB/s instead of 3-4 GB/s on loopback.
MAX_PART_BYTES: Final = 16 * 1024 * 1024
# A batch's targets frame (captions, JSON records, boxes): generous, but bounded.
MAX_TARGETS_BYTES: Final = 256 * 1024 * 1024


class Kind(IntEnum):
    """What a message is. The numbers are part of the protocol: never reuse one."""

    HELLO = 1
    """Client -> server: open a job (its spec); answered by ``JOB_INFO`` or ``ERROR``."""
    JOB_INFO = 2
    """Server -> client: the job's id, dataset size, batches per rank and granted prefetch."""
    REQUEST = 3
    """Client -> server: produce batch ``k`` of ``(job, epoch, rank)``; answered by ``BATCH`` or ``ERROR``."""
    BATCH = 4
    """Server -> client: one batch; the frames after the header hold the ``uint8`` NHWC image bytes."""
    ERROR = 5
    """Either way: a request failed; ``code`` is an :class:`ErrorCode`, ``message`` says why."""
    BYE = 6
    """Client -> server: the client is closing; drop its queued requests."""


class ErrorCode(IntEnum):
    """Why a request failed. Codes are stable across versions."""

    BAD_MESSAGE = 1
    """The frames did not follow the wire format."""
    UNSUPPORTED_VERSION = 2
    """The peer speaks another protocol version."""
    UNKNOWN_DATASET = 3
    """The job names a dataset the server does not declare."""
    UNKNOWN_PIPELINE = 4
    """The job names a pipeline the server does not declare."""
    INVALID_JOB = 5
    """A job parameter is out of range (batch size, image size, world size...)."""
    OUT_OF_RANGE = 6
    """Epoch, rank or batch number outside the job's plan (``k`` past the end of the epoch)."""
    BUSY = 7
    """The client has more requests in flight than the server's prefetch cap; retry later."""
    BAD_SAMPLE = 8
    """A sample failed to decode and the server's policy is ``on_error = "raise"``."""
    SHUTTING_DOWN = 9
    """The server is draining; ask another server or retry after it restarts."""
    DATASET_CHANGED = 10
    """The server's dataset differs from the one the job was opened on (fingerprint mismatch)."""
    INTERNAL = 11
    """An unexpected failure inside the server (a bug, or a worker that failed on a sample for a reason
    that is not the file's); ``path`` and ``traceback`` say where. The request can be retried."""
    PIPELINE = 12
    """A post-op of the pipeline (a torchvision transform or a plugin) failed on a sample or returned a
    wrong image; ``op``, ``path``, ``reason`` and ``traceback`` say which and why. Not retried: the
    same sample fails the same way everywhere."""
    NOT_READY = 13
    """The server is still listing the job's dataset (at start-up); ask again shortly."""
    STORAGE_UNAVAILABLE = 14
    """The dataset's storage could not be reached after the server's retries; the request can be
    retried (the client does, a few times, then raises)."""


@dataclass(frozen=True, slots=True)
class Header:
    """A decoded header frame: its kind and its checked fields."""

    kind: Kind
    fields: dict[str, Any]


def encode(kind: Kind, fields: dict[str, Any]) -> bytes:
    """Return the header frame for a message of ``kind`` with ``fields``."""
    return msgpack.packb([MAGIC, PROTOCOL_VERSION, int(kind), fields], use_bin_type=True)


def decode(frame: bytes | memoryview) -> Header:
    """Parse and check a header frame; raise :class:`ProtocolError` for anything malformed."""
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(frame)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        obj = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            max_array_len=MAX_BATCH_SAMPLES + 16,
            max_map_len=64,
            max_str_len=64 * 1024,
            max_bin_len=64 * 1024,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types for garbage; all mean the same here
        raise ProtocolError(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, list) or len(obj) != 4:
        raise ProtocolError("header must be a 4-element array [magic, version, kind, fields]")
    magic, version, kind, fields = obj
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}: not a stoker message")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version!r} is not supported; this side speaks {PROTOCOL_VERSION} "
            "(install the same stoker version on the trainer and the loader servers)",
            code=ErrorCode.UNSUPPORTED_VERSION,
        )
    if not isinstance(kind, int) or isinstance(kind, bool) or kind not in Kind._value2member_map_:
        raise ProtocolError(f"unknown message kind {kind!r}; known: {[k.name for k in Kind]}")
    if not isinstance(fields, dict):
        raise ProtocolError("header fields must be a map")
    kind = Kind(kind)
    _check_fields(kind, fields)
    return Header(kind, fields)


def batch_nbytes(shape: list[int] | tuple[int, ...]) -> int:
    """Bytes of a ``uint8`` array of ``shape``."""
    return math.prod(shape)


def view_blocks(shapes: list[list[int]] | list[tuple[int, ...]]) -> list[tuple[int, int]]:
    """``(offset, nbytes)`` of each view's block in a batch's image bytes: the views one after another,
    each an ``n x H x W x 3`` array."""
    blocks, offset = [], 0
    for shape in shapes:
        size = batch_nbytes(shape)
        blocks.append((offset, size))
        offset += size
    return blocks


def payload_parts(nbytes: int, sample_bytes: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of each image frame of a batch: whole samples, at most ``MAX_PART_BYTES``."""
    step = max(1, MAX_PART_BYTES // max(1, sample_bytes)) * max(1, sample_bytes)
    return [(offset, min(step, nbytes - offset)) for offset in range(0, nbytes, step)] or [(0, 0)]


def box_labels_name(field: str) -> str:
    """The targets-frame key of a boxes field's classes: ``box_labels`` for ``boxes``, else ``<field>_labels``."""
    return "box_labels" if field == "boxes" else f"{field}_labels"


def decode_targets(frame: bytes | memoryview, rows: int) -> dict[str, list[Any]]:
    """Parse and check a BATCH's targets frame: a map with one list of ``rows`` values per field (a
    boxes field also has its ``box_labels``)."""
    if len(frame) > MAX_TARGETS_BYTES:
        raise ProtocolError(f"targets frame of {len(frame)} bytes exceeds {MAX_TARGETS_BYTES}")
    try:
        obj = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_ext_len=0)
    except Exception as exc:  # msgpack raises many types for garbage; all mean the same here
        raise ProtocolError(f"targets frame is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict) or any(not isinstance(v, list) or len(v) != rows for v in obj.values()):
        raise ProtocolError(f"targets frame must map each field to a list of {rows} values")
    return obj


# Field checks: name -> (type, required). ``int`` rejects bools; ``float`` accepts ints.
_INT, _FLOAT, _STR, _MAP, _INTS, _STRS, _SHAPES = "int", "float", "str", "map", "ints", "strs", "shapes"
_SCHEMA: dict[Kind, dict[str, tuple[str, bool]]] = {
    Kind.HELLO: {"job": (_MAP, True), "client": (_STR, True), "rank": (_INT, False), "prefetch": (_INT, False)},
    Kind.JOB_INFO: {
        "job_id": (_STR, True),
        "samples": (_INT, True),
        "classes": (_STRS, True),
        "batches": (_INT, True),
        "image_shape": (_INTS, True),
        "fingerprint": (_STR, True),
        "prefetch": (_INT, True),
        "server": (_STR, False),
        "views": (_SHAPES, False),
        "mixture": (_MAP, False),
        "targets": (_MAP, False),
    },
    Kind.REQUEST: {
        "job": (_MAP, True),
        "epoch": (_INT, True),
        "rank": (_INT, True),
        "k": (_INT, True),
        "client": (_STR, True),
        "fingerprint": (_STR, False),
        "waited_s": (_FLOAT, False),
        "elapsed_s": (_FLOAT, False),
        "images": (_INT, False),
        "weight": (_FLOAT, False),
    },
    Kind.BATCH: {
        "job_id": (_STR, True),
        "epoch": (_INT, True),
        "rank": (_INT, True),
        "k": (_INT, True),
        "dtype": (_STR, True),
        "shape": (_INTS, True),
        "labels": (_INTS, True),
        "indices": (_INTS, True),
        "views": (_SHAPES, False),
        "sources": (_INTS, False),
        "targets": (_STRS, False),
        "mask": (_INTS, False),
    },
    Kind.ERROR: {
        "code": (_INT, True),
        "message": (_STR, True),
        "epoch": (_INT, False),
        "rank": (_INT, False),
        "k": (_INT, False),
        "path": (_STR, False),
        "reason": (_STR, False),
        "traceback": (_STR, False),
        "op": (_STR, False),
        "retry_after_s": (_FLOAT, False),
        "prefetch": (_INT, False),
    },
    Kind.BYE: {"client": (_STR, True)},
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_CHECKS: dict[str, Callable[[Any], bool]] = {
    _INT: _is_int,
    _FLOAT: lambda v: (_is_int(v) or isinstance(v, float)) and math.isfinite(v),
    _STR: lambda v: isinstance(v, str),
    _MAP: lambda v: isinstance(v, dict),
    _INTS: lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
    _STRS: lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    _SHAPES: lambda v: (
        isinstance(v, list) and 0 < len(v) <= 64 and all(isinstance(s, list) and all(_is_int(x) for x in s) for s in v)
    ),
}


def _check_fields(kind: Kind, fields: dict[str, Any]) -> None:
    for name, (type_, required) in _SCHEMA[kind].items():
        if name not in fields:
            if required:
                raise ProtocolError(f"{kind.name} lacks the field {name!r}")
            continue
        if not _CHECKS[type_](fields[name]):
            raise ProtocolError(f"{kind.name} field {name!r} must be {type_}, got {type(fields[name]).__name__}")
