"""The trainer runtime: ``RemoteBatches`` and the machinery under it: links to servers (``links``), the
session that speaks the protocol (``session``), the in-order batch stream (``stream``), what ERROR
replies mean (``replies``), multipart receiving (``framing``) and pinned receive buffers (``buffers``).

Only ``RemoteBatches`` (``remote``, ``buffers``) needs torch, and it is imported on first use, so the
protocol machinery can be used and tested without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stoker.client.runtime.remote import IMAGENET_MEAN, IMAGENET_STD, RemoteBatches

__all__ = ["RemoteBatches", "IMAGENET_MEAN", "IMAGENET_STD"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from stoker.client.runtime import remote

        return getattr(remote, name)
    raise AttributeError(f"module 'stoker.client.runtime' has no attribute {name!r}")
