"""The CUDA path: pinned receive buffers, non-blocking copies, channels_last output on the device."""

from __future__ import annotations

import pytest
import torch

from stoker.client import RemoteBatches

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)"),
]


def test_batches_arrive_on_the_gpu_normalised_and_channels_last(cluster) -> None:
    server = cluster.start()
    with RemoteBatches(server.data, "demo", batch_size=16, image_size=64, device="cuda", timeout_s=60) as b:
        seen = 0
        for images, labels in b:
            assert images.is_cuda and labels.is_cuda
            assert images.dtype == torch.float32 and images.is_contiguous(memory_format=torch.channels_last)
            seen += images.shape[0]
        assert seen == 48
        assert b._pinned is not None and 0 < b._pinned.allocated <= b.prefetch + 4
        assert all(buffer.is_pinned() for buffer in b._pinned._free)


def test_gpu_bytes_equal_cpu_bytes(cluster) -> None:
    server = cluster.start()
    options = dict(batch_size=8, image_size=32, normalize=False, timeout_s=60, seed=4)
    with RemoteBatches(server.data, "demo", device="cuda", **options) as gpu:
        on_gpu = [images.cpu() for images, _ in gpu]
    with RemoteBatches(server.data, "demo", device="cpu", **options) as cpu:
        on_cpu = [images for images, _ in cpu]
    assert all(torch.equal(a, b) for a, b in zip(on_gpu, on_cpu, strict=False))
