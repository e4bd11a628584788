"""The trainer runtime: ``RemoteBatches`` and the machinery under it (links to servers, the session
that speaks the protocol, the in-order batch stream, pinned receive buffers). Imports torch."""

from stoker.client.runtime.remote import IMAGENET_MEAN, IMAGENET_STD, RemoteBatches

__all__ = ["RemoteBatches", "IMAGENET_MEAN", "IMAGENET_STD"]
