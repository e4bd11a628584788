"""What one step of ``RemoteBatches`` yields, made from a received batch: ``(images, labels)`` or
``(images, labels, indices)``. Everything a batch carries besides its image bytes becomes a tensor here;
the images themselves are the :class:`~stoker.client.runtime.tensors.Converter`'s."""

from __future__ import annotations

from typing import Any

import torch

from stoker.client.runtime.buffers import PinnedPool
from stoker.client.runtime.session import RawBatch
from stoker.client.runtime.tensors import Converter

__all__ = ["BatchOutput"]


class BatchOutput:
    """Turns a :class:`RawBatch` into the tuple a training step takes, on the converter's device."""

    def __init__(self, converter: Converter, return_indices: bool, return_sources: bool = False) -> None:
        self.converter = converter
        self.return_indices = return_indices
        self.return_sources = return_sources

    def __call__(self, raw: RawBatch, pinned: PinnedPool | None) -> tuple[Any, ...]:
        """The tuple for ``raw``; ``pinned`` gets back the pinned buffer ``raw`` arrived in, if any."""
        fields = raw.fields
        views = self.converter.images(raw, pinned)
        labels = torch.tensor(fields["labels"], dtype=torch.int64).to(self.converter.device, non_blocking=True)
        images: Any = views if "views" in fields else views[0]  # a multi-view pipeline: one tensor per view
        out: tuple[Any, ...] = (images, labels)
        if self.return_indices:
            out += (torch.tensor(fields["indices"], dtype=torch.int64),)
        if self.return_sources:  # a mixture's source of each row (0 for a dataset)
            sources = fields.get("sources") or [0] * len(fields["labels"])
            out += (torch.tensor(sources, dtype=torch.int64),)
        return out

    def forget_device_state(self) -> None:
        """Drop cached device tensors (a forked copy must not reuse its parent's CUDA objects)."""
        self.converter.forget_device_state()
