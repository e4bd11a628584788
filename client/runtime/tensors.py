"""From received bytes to the tensors a training step takes: on the device, NCHW, normalised there.

Bytes arrive as ``uint8`` in the layout the job asked for (one block per view): NCHW for the default
contiguous format, NHWC for channels-last, written so by the server's workers. A pinned host buffer is
copied to the device without blocking, in one copy for every view; a ZeroMQ frame is wrapped without
copying, so either layout reaches the loop with no host copy. NHWC viewed as NCHW is the channels-last
layout. (A batch in the other layout, from a server that wrote NHWC for a contiguous job, is made
contiguous here, in the same pass as the float conversion when normalising.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import zmq

from stoker.client.protocol.wire import view_blocks
from stoker.client.runtime.buffers import PinnedPool
from stoker.client.runtime.session import RawBatch

__all__ = ["Converter", "MEMORY_FORMATS"]

MEMORY_FORMATS = (torch.contiguous_format, torch.channels_last, torch.preserve_format)
"""``preserve_format`` keeps the layout the bytes arrive in: channels-last."""


class Converter:
    """Turns a :class:`RawBatch` into image tensors and counts what it delivered."""

    def __init__(
        self,
        device: torch.device,
        normalize: bool,
        mean: Sequence[float],
        std: Sequence[float],
        memory_format: torch.memory_format,
    ) -> None:
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(f"{memory_format=} must be torch.contiguous_format or torch.channels_last")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean={tuple(mean)} and std={tuple(std)} must be 3 values each, std > 0")
        self.device = device
        self.normalize = normalize
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.contiguous = memory_format == torch.contiguous_format
        self._scale: tuple[torch.Tensor, torch.Tensor] | None = None

    def __getstate__(self) -> dict[str, object]:
        # A copy for another process (DataLoader workers) rebuilds its device tensors there.
        return {
            **{name: getattr(self, name) for name in ("device", "normalize", "mean", "std", "contiguous")},
            "_scale": None,
        }

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)

    def forget_device_state(self) -> None:
        """Drop cached device tensors (a forked copy must not reuse its parent's CUDA objects)."""
        self._scale = None

    def images(self, raw: RawBatch, pinned: PinnedPool | None) -> list[torch.Tensor]:
        """One ``N x 3 x H x W`` tensor per view, on the device."""
        shapes = raw.fields.get("views", [raw.fields["shape"]])
        blocks = view_blocks(shapes)
        nbytes = sum(size for _, size in blocks)
        if isinstance(raw.data, torch.Tensor):  # pinned buffer: one non-blocking copy for every view
            flat = raw.data[:nbytes].to(self.device, non_blocking=True)
            if pinned is not None:
                pinned.give_back(raw.data, torch.cuda.current_stream(self.device))
        else:  # a ZeroMQ frame (wrapped without copying) or frames gathered into one array
            data = raw.data.buffer if isinstance(raw.data, zmq.Frame) else raw.data
            flat = torch.frombuffer(data, dtype=torch.uint8, count=nbytes)
            if self.device.type != "cpu":
                flat = flat.to(self.device)
        return [
            self._finish(flat[offset : offset + size].view(*shape))
            for (offset, size), shape in zip(blocks, shapes, strict=True)
        ]

    def _finish(self, block: torch.Tensor) -> torch.Tensor:
        if block.shape[-1] != 3:  # NCHW bytes (a side is at least 8): already the contiguous tensor
            if self.normalize:
                mean, std = self._normalizer()
                layout = torch.contiguous_format if self.contiguous else torch.channels_last
                return block.to(dtype=torch.float32, memory_format=layout).sub_(mean).div_(std)
            return block if self.contiguous else block.contiguous(memory_format=torch.channels_last)
        nhwc = block
        images = nhwc.permute(0, 3, 1, 2)  # channels-last memory, NCHW indexing: no copy
        layout = torch.contiguous_format if self.contiguous else torch.channels_last
        if self.normalize:
            mean, std = self._normalizer()
            return images.to(dtype=torch.float32, memory_format=layout).sub_(mean).div_(std)
        if not self.contiguous:
            return images
        if nhwc.device.type == "cpu":
            # numpy transposes 3-byte pixels about three times faster than torch's permute copy.
            return torch.from_numpy(np.ascontiguousarray(nhwc.numpy().transpose(0, 3, 1, 2)))
        return images.contiguous()

    def _normalizer(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._scale is None:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0
            std = torch.tensor(self.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0
            self._scale = (mean, std)
        return self._scale
