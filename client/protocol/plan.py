"""The planner: a pure function from ``(job, epoch, rank, k)`` to the dataset indices of one batch.

An epoch is a seeded permutation of the dataset. With ``drop_last=False`` it is padded with its own
first samples (cyclically, as ``DistributedSampler`` does) to a multiple of ``world_size``; with
``drop_last=True`` it is cut to ``floor(N / (B * W)) * B * W`` samples. The kept samples are cut into
global batches of ``B``; global batch ``g = k * W + r`` is batch ``k`` of rank ``r``. When the padded
length is not a multiple of ``B * W``, the tail is split into ``W`` equal short batches, one per rank,
so every rank gets the same number of batches and only the last one is short.

Because the plan depends only on the spec and the epoch, any server can produce any batch and a
client's progress is just ``(epoch, k)``.
"""

from __future__ import annotations

import math

import numpy as np

from stoker.client.protocol.rng import mix, splitmix64_array

__all__ = ["batches_per_rank", "batch_sizes", "permutation", "batch_positions", "batch_indices", "sample_seed"]

# Domain separators keep the permutation key and the per-sample keys independent streams.
_PERMUTATION_DOMAIN = 0x5045524D
_SAMPLE_DOMAIN = 0x53414D50


def _samples_per_rank(num_samples: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    if drop_last:
        return (num_samples // (batch_size * world_size)) * batch_size
    return math.ceil(num_samples / world_size)


def batches_per_rank(num_samples: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    """How many batches each rank gets in one epoch (the same for every rank)."""
    if num_samples <= 0:
        return 0
    return math.ceil(_samples_per_rank(num_samples, batch_size, world_size, drop_last) / batch_size)


def batch_sizes(num_samples: int, batch_size: int, world_size: int, drop_last: bool) -> tuple[int, int]:
    """``(full, last)``: the size of every batch but the last, and of the last, on every rank."""
    per_rank = _samples_per_rank(num_samples, batch_size, world_size, drop_last)
    count = math.ceil(per_rank / batch_size) if per_rank else 0
    return batch_size, per_rank - (count - 1) * batch_size if count else 0


def permutation(num_samples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The epoch's order of dataset indices (``int64``); dataset order when ``shuffle`` is false.

    Sorting by a counter-based hash rather than calling a library shuffle keeps the order identical
    across numpy versions and hosts, which byte-identical batches across servers depend on.
    """
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    base = np.uint64(mix(_PERMUTATION_DOMAIN, seed, epoch))
    keys = splitmix64_array(np.arange(num_samples, dtype=np.uint64) ^ base)
    return np.argsort(keys, kind="stable").astype(np.int64, copy=False)


def batch_positions(num_samples: int, batch_size: int, world_size: int, drop_last: bool, rank: int, k: int) -> range:
    """Positions in the (padded) epoch order that make batch ``k`` of ``rank``."""
    count = batches_per_rank(num_samples, batch_size, world_size, drop_last)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, {world_size})")
    if not 0 <= k < count:
        raise ValueError(f"k={k} must be in [0, {count}) for this job")
    full, last = batch_sizes(num_samples, batch_size, world_size, drop_last)
    if k < count - 1 or last == full:
        start = (k * world_size + rank) * full
        return range(start, start + full)
    start = (count - 1) * world_size * full + rank * last
    return range(start, start + last)


def batch_indices(
    order: np.ndarray, batch_size: int, world_size: int, drop_last: bool, rank: int, k: int
) -> np.ndarray:
    """Dataset indices of batch ``k`` of ``rank``, given the epoch's ``order`` from :func:`permutation`."""
    positions = batch_positions(len(order), batch_size, world_size, drop_last, rank, k)
    # Positions past the end wrap to the order's own first samples: DistributedSampler's padding.
    return order[np.arange(positions.start, positions.stop) % len(order)]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The key of sample ``index``'s augmentation RNG in ``epoch``."""
    return mix(_SAMPLE_DOMAIN, seed, epoch, index)
