"""The trainer runtime: ``RemoteBatches`` and the parts it composes: its live ``connection`` (session,
pinned buffers, fork safety), the ``feed`` (which batches to ask for, one epoch ahead, DataLoader-worker
shares), its ``position`` and the ``checkpoint`` format that saves it, the ``output`` it yields (images
by ``tensors``) and its ``stats``. Under them: links to servers (``links``), the session that speaks the
protocol (``session``), the in-order batch stream (``stream``), what ERROR replies mean (``replies``),
multipart receiving (``framing``) and pinned receive buffers (``buffers``).

Only ``RemoteBatches`` and the parts that make tensors need torch, and they are imported on first use,
so the protocol machinery (and ``position``, ``checkpoint``, ``stats``) can be used and tested without it."""

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
