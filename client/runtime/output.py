"""What one step of ``RemoteBatches`` yields, made from a received batch: ``(images, labels)`` or
``(images, labels, indices)``. Everything a batch carries besides its image bytes becomes a tensor here;
the images themselves are the :class:`~stoker.client.runtime.tensors.Converter`'s."""

from __future__ import annotations

import json
from typing import Any

import torch

from stoker.client.protocol.wire import box_labels_name
from stoker.client.runtime.buffers import PinnedPool
from stoker.client.runtime.session import RawBatch
from stoker.client.runtime.tensors import Converter

__all__ = ["BatchOutput"]


def _array(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    """A little-endian array from the targets frame (a copy: the frame is read-only; empty is fine)."""
    if not data:
        return torch.zeros(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)


class BatchOutput:
    """Turns a :class:`RawBatch` into the tuple a training step takes, on the converter's device."""

    def __init__(self, converter: Converter, return_indices: bool, return_sources: bool = False) -> None:
        self.converter = converter
        self.return_indices = return_indices
        self.return_sources = return_sources
        self.kinds: dict[str, str] | None = None
        """The job's targets, field -> kind (from the servers' job info), when it asked for any (an
        empty dict: it asked, and the dataset has none: the dict yielded is empty)."""

    def __call__(self, raw: RawBatch, pinned: PinnedPool | None) -> tuple[Any, ...]:
        """The tuple for ``raw``; ``pinned`` gets back the pinned buffer ``raw`` arrived in, if any."""
        fields = raw.fields
        views = self.converter.images(raw, pinned)
        images: Any = views if "views" in fields else views[0]  # a multi-view pipeline: one tensor per view
        if "targets" in fields or self.kinds is not None:
            second: Any = self._targets(raw)
        else:
            second = torch.tensor(fields["labels"], dtype=torch.int64).to(self.converter.device, non_blocking=True)
        out: tuple[Any, ...] = (images, second)
        if self.return_indices:
            out += (torch.tensor(fields["indices"], dtype=torch.int64),)
        if self.return_sources:  # a mixture's source of each row (0 for a dataset)
            sources = fields.get("sources") or [0] * len(fields["labels"])
            out += (torch.tensor(sources, dtype=torch.int64),)
        return out

    def _targets(self, raw: RawBatch) -> dict[str, Any]:
        """The targets dict: each field as its kind says (see ``RemoteBatches``)."""
        device = self.converter.device
        kinds = self.kinds or {}
        values = raw.targets or {}
        out: dict[str, Any] = {}
        for name in raw.fields.get("targets", []):
            kind = kinds.get(name, "label")
            if kind == "mask":
                shape = raw.fields["mask"]
                data = raw.mask.buffer if raw.mask is not None else b""
                out[name] = torch.frombuffer(data, dtype=torch.uint8).view(*shape).to(device)
            elif kind == "label":
                out[name] = torch.tensor(values.get(name, []), dtype=torch.int64).to(device, non_blocking=True)
            elif kind == "text":
                out[name] = list(values.get(name, []))
            elif kind == "json":
                out[name] = [json.loads(text) for text in values.get(name, [])]
            elif kind == "boxes":
                labels_name = box_labels_name(name)
                out[name] = [_array(b, torch.float32).view(-1, 4) for b in values[name]]
                out[labels_name] = [_array(b, torch.int64) for b in values[labels_name]]
        return out

    def forget_device_state(self) -> None:
        """Drop cached device tensors (a forked copy must not reuse its parent's CUDA objects)."""
        self.converter.forget_device_state()
