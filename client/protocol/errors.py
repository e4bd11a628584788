"""Typed errors a stoker client raises.

Every failure a user can act on has its own class, so training scripts can tell "the server is down"
from "my job spec is wrong" from "the dataset has a bad file" without parsing messages.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "StokerError",
    "ProtocolError",
    "ServerError",
    "UnknownDatasetError",
    "InvalidJobError",
    "BadSampleError",
    "PipelineError",
    "StokerTimeoutError",
]


class StokerError(Exception):
    """Base class of every error stoker raises on purpose."""


class ProtocolError(StokerError):
    """A frame that does not follow the wire format (wrong magic, version, kind or fields).

    ``code`` is the :class:`stoker.client.protocol.wire.ErrorCode` the server answers such a frame with.
    """

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class ServerError(StokerError):
    """The server answered a request with an ``ERROR`` message."""

    def __init__(self, message: str, code: int, endpoint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.endpoint = endpoint
        if endpoint:
            self.add_note(f"reported by stoker server {endpoint}")


class UnknownDatasetError(ServerError, LookupError):
    """The dataset or pipeline named in the job is not declared on the server."""


class InvalidJobError(ServerError, ValueError):
    """The job's parameters are out of range for the server or the dataset."""


class BadSampleError(ServerError):
    """A sample could not be decoded and the server runs with ``on_error = "raise"``.

    ``path`` is the file on the server, ``reason`` what went wrong with it.
    """

    def __init__(self, message: str, code: int, endpoint: str | None = None, path: str = "", reason: str = "") -> None:
        super().__init__(message, code, endpoint)
        self.path = path
        self.reason = reason


class PipelineError(ServerError):
    """A post-op of the server's pipeline (a torchvision transform or an operator plugin) failed on a
    sample, or returned something other than the view's image. Not a bad file: it is not retried and
    the sample is not replaced. ``op`` names the op, ``path`` the sample, ``traceback`` is the
    worker's (also attached as a note)."""

    def __init__(
        self, message: str, code: int, endpoint: str | None = None, op: str = "", path: str = "", traceback: str = ""
    ) -> None:
        super().__init__(message, code, endpoint)
        self.op = op
        self.path = path
        self.traceback = traceback


class StokerTimeoutError(StokerError, TimeoutError):
    """No server answered within ``timeout_s``."""


class AuthenticationError(StokerError, PermissionError):
    """A server refused this client at the CURVE handshake: no keys where the server needs them, the
    wrong server key, or a client key the server does not authorise. Raised within seconds of
    connecting (from the socket's handshake events), never as a timeout."""

    def __init__(self, message: str, endpoint: str) -> None:
        super().__init__(message)
        self.endpoint = endpoint
