"""The per-core limit: how many JPEGs per second the fastest decoder here decodes on one core."""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["decoders", "single_core_rates"]


def decoders() -> dict[str, Callable[[bytes], object]]:
    """Full-size RGB decoders available here, by name."""
    import simplejpeg
    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    def pillow(data: bytes) -> object:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))

    def torchvision_jpeg(data: bytes) -> object:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)

    return {
        "simplejpeg (libjpeg-turbo)": lambda data: simplejpeg.decode_jpeg(data, "RGB"),
        "torchvision.io.decode_jpeg": torchvision_jpeg,
        "Pillow": pillow,
    }


def single_core_rates(files: list[Path], seconds: float) -> dict[str, float]:
    """Images/s of each decoder on one core, over files held in memory (no I/O)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    payloads = [path.read_bytes() for path in files if path.suffix.lower() in (".jpg", ".jpeg")]
    rates: dict[str, float] = {}
    try:
        for name, decode in decoders().items():
            decode(payloads[0])
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                decode(payloads[count % len(payloads)])
                count += 1
            rates[name] = count / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return rates
