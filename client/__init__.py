"""stoker's client: ``RemoteBatches`` streams batches from loader servers into a training loop.

Importing this package is light (no torch until ``RemoteBatches`` is used) because the server imports
the shared wire format, job spec and planner from here too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stoker.client.protocol.errors import (
    AuthenticationError,
    BadSampleError,
    InvalidJobError,
    PipelineError,
    ProtocolError,
    ServerError,
    StokerError,
    StokerTimeoutError,
    UnknownDatasetError,
)
from stoker.client.protocol.job import JobSpec

if TYPE_CHECKING:
    from stoker.client.runtime.remote import IMAGENET_MEAN, IMAGENET_STD, RemoteBatches

__all__ = [
    "RemoteBatches",
    "JobSpec",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "StokerError",
    "ProtocolError",
    "ServerError",
    "UnknownDatasetError",
    "InvalidJobError",
    "BadSampleError",
    "PipelineError",
    "StokerTimeoutError",
    "AuthenticationError",
]

_LAZY = {"RemoteBatches", "IMAGENET_MEAN", "IMAGENET_STD"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from stoker.client.runtime import remote

        return getattr(remote, name)
    raise AttributeError(f"module 'stoker.client' has no attribute {name!r}")
