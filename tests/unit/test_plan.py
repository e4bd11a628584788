"""The planner's invariants: exactly once, equal counts per rank, short last batch only, determinism."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stoker.client.protocol.plan import batch_indices, batches_per_rank, permutation, sample_seed


def epoch_batches(n: int, b: int, w: int, drop_last: bool, seed: int = 0, epoch: int = 0, shuffle: bool = True):
    order = permutation(n, seed, epoch, shuffle)
    count = batches_per_rank(n, b, w, drop_last)
    return order, {r: [batch_indices(order, b, w, drop_last, r, k) for k in range(count)] for r in range(w)}


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 500), st.integers(1, 40), st.integers(1, 9), st.integers(0, 2**32), st.integers(0, 50))
def test_drop_last_false_covers_every_sample_once_plus_distributed_padding(n, b, w, seed, epoch) -> None:
    order, per_rank = epoch_batches(n, b, w, False, seed, epoch)
    counts = {r: len(batches) for r, batches in per_rank.items()}
    assert len(set(counts.values())) == 1, "every rank must get the same number of batches"
    everything = np.concatenate([np.concatenate(batches) for batches in per_rank.values()])
    total = math.ceil(n / w) * w
    assert len(everything) == total
    seen = Counter(everything.tolist())
    assert set(seen) == set(range(n)), "every sample appears"
    # Padding repeats the order's own first samples, DistributedSampler style.
    padding = Counter(np.resize(order, total - n).tolist()) if total > n else Counter()
    assert seen == Counter(range(n)) + padding
    for batches in per_rank.values():
        sizes = [len(x) for x in batches]
        assert all(size == b for size in sizes[:-1]), "only the last batch may be short"
        assert 0 < sizes[-1] <= b
    assert len({len(batches[-1]) for batches in per_rank.values()}) == 1


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 500), st.integers(1, 40), st.integers(1, 9), st.integers(0, 2**32))
def test_drop_last_true_takes_the_first_full_batches_of_the_order(n, b, w, seed) -> None:
    order, per_rank = epoch_batches(n, b, w, True, seed)
    kept = (n // (b * w)) * b * w
    everything = [i for batches in per_rank.values() for batch in batches for i in batch.tolist()]
    assert sorted(everything) == sorted(order[:kept].tolist())
    assert all(len(batch) == b for batches in per_rank.values() for batch in batches)
    assert len({len(batches) for batches in per_rank.values()}) == 1


def test_global_batch_g_goes_to_rank_g_mod_world_size() -> None:
    order, per_rank = epoch_batches(100, 4, 3, False)
    assert per_rank[1][0].tolist() == order[4:8].tolist()
    assert per_rank[0][1].tolist() == order[12:16].tolist()


def test_shuffle_false_keeps_dataset_order() -> None:
    _, per_rank = epoch_batches(10, 3, 1, False, shuffle=False)
    assert np.concatenate(per_rank[0]).tolist() == list(range(10))


def test_permutation_is_deterministic_and_depends_on_seed_and_epoch() -> None:
    a = permutation(1000, 7, 3, True)
    assert a.tolist() == permutation(1000, 7, 3, True).tolist()
    assert sorted(a.tolist()) == list(range(1000))
    assert a.tolist() != permutation(1000, 7, 4, True).tolist()
    assert a.tolist() != permutation(1000, 8, 3, True).tolist()


def test_permutation_is_pinned_across_versions() -> None:
    # Changing this order would change every user's batches: treat it as a protocol change.
    assert permutation(10, 0, 0, True).tolist() == PINNED_ORDER
    assert sample_seed(0, 0, 0) == PINNED_SEED


def test_out_of_range_batches_are_refused() -> None:
    order = permutation(10, 0, 0, True)
    with pytest.raises(ValueError, match="k="):
        batch_indices(order, 4, 1, False, 0, 3)
    with pytest.raises(ValueError, match="rank="):
        batch_indices(order, 4, 2, False, 2, 0)


def test_empty_dataset_has_no_batches() -> None:
    assert batches_per_rank(0, 4, 2, False) == 0
    assert batches_per_rank(7, 4, 2, True) == 0


PINNED_ORDER = [2, 4, 5, 9, 1, 0, 8, 3, 7, 6]
PINNED_SEED = 1770606634229020124
