"""Counter-based random numbers that are the same on every host, numpy version and worker count.

Sample ``i`` of epoch ``e`` draws its augmentation parameters from ``SampleRng(mix(seed, e, i))``, so
any server can produce any sample's bytes without shared RNG state. SplitMix64 is tiny, fast and
statistically fine for picking crop boxes; it is not for cryptography.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["mix", "splitmix64", "splitmix64_array", "SampleRng"]

_MASK = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def splitmix64(x: int) -> int:
    """One SplitMix64 step on a Python int, as an unsigned 64-bit value."""
    z = (x + _GAMMA) & _MASK
    z = ((z ^ (z >> 30)) * _M1) & _MASK
    z = ((z ^ (z >> 27)) * _M2) & _MASK
    return z ^ (z >> 31)


def splitmix64_array(x: np.ndarray) -> np.ndarray:
    """SplitMix64 of every element of a ``uint64`` array (wrapping arithmetic, no copies kept)."""
    z = x.astype(np.uint64, copy=True)
    z += np.uint64(_GAMMA)
    z ^= z >> np.uint64(30)
    z *= np.uint64(_M1)
    z ^= z >> np.uint64(27)
    z *= np.uint64(_M2)
    z ^= z >> np.uint64(31)
    return z


def mix(*values: int) -> int:
    """Fold integers into one 64-bit key; order matters, so ``mix(1, 2) != mix(2, 1)``."""
    key = 0x5EED
    for value in values:
        key = splitmix64(key ^ (value & _MASK))
    return key


class SampleRng:
    """A stream of uniform numbers derived from one key by counting."""

    __slots__ = ("_key", "_counter")

    def __init__(self, key: int) -> None:
        self._key = key & _MASK
        self._counter = 0

    def random(self) -> float:
        """A float in [0, 1) with 53 random bits."""
        self._counter += 1
        return (splitmix64(self._key ^ (self._counter * _GAMMA & _MASK)) >> 11) * (1.0 / (1 << 53))

    def uniform(self, low: float, high: float) -> float:
        """A float in [low, high)."""
        return low + (high - low) * self.random()

    def log_uniform(self, low: float, high: float) -> float:
        """A float whose logarithm is uniform in [log(low), log(high))."""
        return math.exp(self.uniform(math.log(low), math.log(high)))

    def randint(self, low: int, high: int) -> int:
        """An int in [low, high] (both ends included)."""
        return low + min(int(self.random() * (high - low + 1)), high - low)
