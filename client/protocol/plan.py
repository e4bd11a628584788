"""The planner: a pure function from ``(job, epoch, rank, k)`` to the dataset indices of one batch.

An epoch is a seeded permutation of the dataset. With ``drop_last=False`` it is padded with its own
first samples (cyclically, as ``DistributedSampler`` does) to a multiple of ``world_size``; with
``drop_last=True`` it is cut to ``floor(N / (B * W)) * B * W`` samples. The kept samples are cut into
global batches of ``B``; global batch ``g = k * W + r`` is batch ``k`` of rank ``r``. When the padded
length is not a multiple of ``B * W``, the tail is split into ``W`` equal short batches, one per rank,
so every rank gets the same number of batches and only the last one is short.

Because the plan depends only on the spec and the epoch, any server can produce any batch and a
client's progress is just ``(epoch, k)``.

**Resuming on another number of ranks.** After ``P`` batches per rank of ``W1`` ranks, the samples
not yet served are one contiguous run of the epoch's order: positions ``[P * B * W1, kept)``, where
``kept`` is the end of the real (unpadded, not dropped) samples. That run, a *span*, is planned again
over the new ``W2`` ranks exactly as a whole epoch is (padding wraps to the span's own first samples,
``drop_last`` cuts the span), so every new rank computes the same re-plan from what a request carries.
A span of a span is again a span of the epoch's order, so a job may be resized any number of times.
"""

from __future__ import annotations

import math

import numpy as np

from stoker.client.protocol.rng import mix, splitmix64_array

__all__ = [
    "Span",
    "batches_per_rank",
    "batch_sizes",
    "permutation",
    "batch_positions",
    "batch_indices",
    "remaining_span",
    "span_length",
    "sample_seed",
]

Span = tuple[int, int]
"""``(start, end)``: the positions of an epoch's order that a resumed epoch serves."""

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
    order: np.ndarray, batch_size: int, world_size: int, drop_last: bool, rank: int, k: int, span: Span | None = None
) -> np.ndarray:
    """Dataset indices of batch ``k`` of ``rank``, given the epoch's ``order`` from :func:`permutation`.

    With ``span``, the batch is one of the re-plan of that part of the order (a resumed epoch).
    """
    start, end = span if span is not None else (0, len(order))
    positions = batch_positions(end - start, batch_size, world_size, drop_last, rank, k)
    # Positions past the end wrap to the span's own first samples: DistributedSampler's padding.
    return order[start + np.arange(positions.start, positions.stop) % (end - start)]


def span_length(span: Span | None, num_samples: int) -> int:
    """Samples a span covers (the whole epoch's ``num_samples`` for ``None``)."""
    return num_samples if span is None else span[1] - span[0]


def remaining_span(
    num_samples: int, batch_size: int, world_size: int, drop_last: bool, position: int, span: Span | None = None
) -> Span:
    """What is left of an epoch (or of its resumed ``span``) after ``position`` batches on each of
    ``world_size`` ranks: the positions of the order not yet served, without padding or dropped tail.

    Every batch but a rank's last is full, so ``position`` batches per rank served exactly the first
    ``position * batch_size * world_size`` positions; a position at or past the end leaves nothing.
    """
    start, end = span if span is not None else (0, num_samples)
    length = end - start
    if not 0 <= start <= end <= num_samples:
        raise ValueError(f"span={span} must lie in [0, {num_samples}]")
    if position < 0:
        raise ValueError(f"{position=} must be >= 0")
    count = batches_per_rank(length, batch_size, world_size, drop_last)
    if position >= count:
        return end, end
    kept = _samples_per_rank(length, batch_size, world_size, drop_last) * world_size if drop_last else length
    return start + position * batch_size * world_size, start + kept


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The key of sample ``index``'s augmentation RNG in ``epoch``."""
    return mix(_SAMPLE_DOMAIN, seed, epoch, index)
