"""Operator plugins for the tests: installed in the server's environment (the tests put this folder on
the server's PYTHONPATH), named by pipelines in its config. Each draws randomness the usual ways
(torch's, Python's and numpy's global generators), which stoker seeds per sample and view."""

from __future__ import annotations

import random

import numpy as np
import torch


class Posterize:
    """Keep the top ``bits`` bits of every channel value (deterministic)."""

    def __init__(self, bits: int = 4) -> None:
        if not 1 <= bits <= 8:
            raise ValueError(f"{bits=} must be in [1, 8]")
        self.mask = (0xFF << (8 - bits)) & 0xFF

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image & self.mask


def random_shift(pixels: int = 4):
    """Roll the image by a random offset drawn from Python's and numpy's generators."""

    def shift(image: torch.Tensor) -> torch.Tensor:
        dx = random.randint(-pixels, pixels)
        dy = int(np.random.randint(-pixels, pixels + 1))
        return torch.roll(image, shifts=(dy, dx), dims=(1, 2))

    return shift


class TorchNoise:
    """Add uniform noise drawn from torch's global generator."""

    def __init__(self, amplitude: int = 20) -> None:
        self.amplitude = amplitude

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        noise = torch.randint(-self.amplitude, self.amplitude + 1, image.shape, dtype=torch.int16)
        return (image.to(torch.int16) + noise).clamp(0, 255).to(torch.uint8)


class FailOnBright:
    """Raise for images brighter than ``threshold`` on average: a plugin bug that hits some samples
    (and not the mid-grey noise stoker tries every post-op on at start-up)."""

    def __init__(self, threshold: float = 140.0) -> None:
        self.threshold = threshold

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.float().mean() > self.threshold:
            raise ValueError(f"mean brightness over {self.threshold}")
        return image


class Shrink:
    """Return a smaller image than the view's output: a pipeline mistake."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image[:, ::2, ::2].contiguous()


def not_callable() -> int:
    """A factory whose product is not a transform."""
    return 3


class NeedsAModel:
    """A transform whose constructor fails in the operator's own code (a missing weights file)."""

    def __init__(self, weights: str = "model.pt") -> None:
        self.model = _load_weights(weights)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image


def _load_weights(weights: str) -> object:
    raise FileNotFoundError(f"no weights at {weights!r}")
