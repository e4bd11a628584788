"""The CUDA path: pinned receive buffers, non-blocking copies, layout and normalisation on the device."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import open_client

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)"),
]


def test_batches_arrive_on_the_gpu_normalised_and_channels_last(cluster) -> None:
    server = cluster.start()
    # The trainer's defaults on a GPU: normalised float images and (images, labels) pairs.
    options = dict(batch_size=16, image_size=64, normalize=True, return_indices=False)
    with open_client(server.data, device="cuda", memory_format=torch.channels_last, **options) as b:
        seen = 0
        for images, labels in b:
            assert images.is_cuda and labels.is_cuda
            assert images.dtype == torch.float32 and images.is_contiguous(memory_format=torch.channels_last)
            seen += images.shape[0]
        assert seen == 48
        pinned = b._connection.pinned
        assert pinned is not None and 0 < pinned.allocated <= b.prefetch + 4
        assert all(buffer.is_pinned() for buffer in pinned._free)
    with open_client(server.data, device="cuda", **options) as b:
        images, _ = next(iter(b))
        assert images.is_cuda and images.is_contiguous(), "the default layout is contiguous NCHW"


def test_gpu_bytes_equal_cpu_bytes(cluster) -> None:
    server = cluster.start()
    options = dict(batch_size=8, image_size=32, seed=4)
    with open_client(server.data, device="cuda", **options) as gpu:
        on_gpu = [images.cpu() for images, _, _ in gpu]
    with open_client(server.data, device="cpu", **options) as cpu:
        on_cpu = [images for images, _, _ in cpu]
    assert all(torch.equal(a, b) for a, b in zip(on_gpu, on_cpu, strict=True))
