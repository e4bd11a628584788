"""What an ``ERROR`` message means to the client: retry it, or raise it as a typed exception that
carries the server's evidence (which batch, which sample, the server's traceback) as notes."""

from __future__ import annotations

from typing import Any

from stoker.client.protocol.errors import (
    BadSampleError,
    InvalidJobError,
    PipelineError,
    ProtocolError,
    ServerError,
    UnknownDatasetError,
)
from stoker.client.protocol.wire import ErrorCode

__all__ = ["TRANSIENT", "MAX_INTERNAL_RETRIES", "is_transient", "server_error"]

TRANSIENT = frozenset(
    {ErrorCode.BUSY, ErrorCode.SHUTTING_DOWN, ErrorCode.INTERNAL, ErrorCode.NOT_READY, ErrorCode.STORAGE_UNAVAILABLE}
)
"""Codes answered by asking again (later, or elsewhere) rather than by raising."""
MAX_INTERNAL_RETRIES = 3
"""How often one batch is asked again after ``INTERNAL`` before the error is raised."""


def is_transient(code: int) -> bool:
    """Whether an ``ERROR`` with ``code`` is worth asking again."""
    return code in TRANSIENT


def server_error(fields: dict[str, Any], endpoint: str) -> ServerError | ProtocolError:
    """The typed exception for an ``ERROR`` message from ``endpoint``, with its evidence as notes."""
    code, message = fields["code"], fields["message"]
    path, reason = fields.get("path", ""), fields.get("reason", "")
    error: ServerError | ProtocolError
    if code in (ErrorCode.UNKNOWN_DATASET, ErrorCode.UNKNOWN_PIPELINE):
        error = UnknownDatasetError(message, code, endpoint)
    elif code in (ErrorCode.INVALID_JOB, ErrorCode.OUT_OF_RANGE, ErrorCode.DATASET_CHANGED):
        error = InvalidJobError(message, code, endpoint)
    elif code == ErrorCode.BAD_SAMPLE:
        error = BadSampleError(message, code, endpoint, path, reason)
    elif code == ErrorCode.PIPELINE:
        error = PipelineError(message, code, endpoint, fields.get("op", ""), path, fields.get("traceback", ""))
    elif code in (ErrorCode.BAD_MESSAGE, ErrorCode.UNSUPPORTED_VERSION):
        error = ProtocolError(f"server refused our message: {message}", code)
        error.add_note(f"reported by stoker server {endpoint}")
    else:
        error = ServerError(message, code, endpoint)
    if "k" in fields:
        error.add_note(f"while producing batch {fields['k']} of epoch {fields.get('epoch')}, rank {fields.get('rank')}")
    if path:
        error.add_note(f"sample {path}" + (f": {reason}" if reason else ""))
    if fields.get("traceback"):
        error.add_note(f"server traceback:\n{fields['traceback'].rstrip()}")
    return error
