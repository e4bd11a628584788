"""The elastic re-plan: what W1 ranks left of an epoch, planned again over W2 ranks.

Properties, for any dataset size, batch size, old and new world sizes, saved position and
``drop_last``: every sample of the epoch is served exactly once over the old ranks' batches before
the save and the new ranks' batches after it (padding aside); the new ranks get equal numbers of
batches; the re-plan is a pure function; resizing twice is the same as resizing once in two steps.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stoker.client.protocol.plan import (
    Span,
    batch_indices,
    batch_positions,
    batches_per_rank,
    permutation,
    remaining_span,
    span_length,
)


def served(order: np.ndarray, b: int, w: int, drop_last: bool, span: Span | None, upto: int | None = None):
    """``(real, padding)``: the indices ``w`` ranks are served from ``span`` in their first ``upto``
    batches each, split into the span's own samples and the padding that repeats them."""
    length = span_length(span, len(order))
    count = batches_per_rank(length, b, w, drop_last)
    real: list[int] = []
    padding: list[int] = []
    for k in range(count if upto is None else min(upto, count)):
        for r in range(w):
            indices = batch_indices(order, b, w, drop_last, r, k, span)
            positions = batch_positions(length, b, w, drop_last, r, k)
            for position, index in zip(positions, indices.tolist(), strict=True):
                (real if position < length else padding).append(index)
    return real, padding


def kept_samples(n: int, b: int, w: int, drop_last: bool) -> int:
    return (n // (b * w)) * b * w if drop_last else n


@settings(max_examples=400, deadline=None)
@given(
    st.integers(1, 400),
    st.integers(1, 24),
    st.integers(1, 8),
    st.integers(1, 8),
    st.integers(0, 30),
    st.booleans(),
    st.integers(0, 2**31),
)
def test_resume_on_another_world_size_serves_every_sample_exactly_once(n, b, w1, w2, position, drop_last, seed):
    order = permutation(n, seed, 3, True)
    before, _ = served(order, b, w1, drop_last, None, upto=position)
    span = remaining_span(n, b, w1, drop_last, position)
    after, padding = served(order, b, w2, drop_last, span)
    union = Counter(before) + Counter(after)
    assert max(union.values(), default=1) == 1, "no sample twice"
    old_kept = set(order[: kept_samples(n, b, w1, drop_last)].tolist())
    if not drop_last:
        assert set(union) == set(range(n)), "every sample once"
    else:
        # The re-plan keeps drop_last's meaning: whole global batches of the new world only.
        assert set(union) <= old_kept
        assert len(old_kept) - len(union) < b * w2
    assert set(padding) <= set(after) | set(before), "padding repeats served samples only"
    counts = {r: batches_per_rank(span_length(span, n), b, w2, drop_last) for r in range(w2)}
    assert len(set(counts.values())) == 1
    assert remaining_span(n, b, w1, drop_last, position) == span, "a pure function"


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 300),
    st.integers(1, 16),
    st.lists(st.tuples(st.integers(1, 6), st.integers(0, 6)), min_size=1, max_size=4),
    st.booleans(),
)
def test_resizing_again_and_again_still_serves_each_sample_once(n, b, steps, drop_last) -> None:
    """2 ranks -> 3 ranks -> 1 rank ...: each save is a position in the previous re-plan."""
    order = permutation(n, 11, 0, True)
    span: Span | None = None
    seen: Counter[int] = Counter()
    for world, position in steps:
        before, _ = served(order, b, world, drop_last, span, upto=position)
        seen.update(before)
        span = remaining_span(n, b, world, drop_last, position, span)
    rest, _ = served(order, b, 1, drop_last, span)
    seen.update(rest)
    assert max(seen.values(), default=1) == 1
    if not drop_last:
        assert set(seen) == set(range(n))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(1, 16), st.integers(1, 6), st.integers(0, 8), st.booleans())
def test_the_same_world_size_continues_where_it_stopped(n, b, w, position, drop_last) -> None:
    """A span resumed on as many ranks as saved it serves the samples the old plan had left, in order."""
    order = permutation(n, 5, 1, True)
    span = remaining_span(n, b, w, drop_last, position)
    count = batches_per_rank(n, b, w, drop_last)
    old_rest, _ = served(order, b, w, drop_last, None)
    old_before, _ = served(order, b, w, drop_last, None, upto=position)
    new_rest, _ = served(order, b, w, drop_last, span)
    assert sorted(old_before + new_rest) == sorted(old_rest)
    if position < count:
        assert span == (position * b * w, kept_samples(n, b, w, drop_last))


def test_a_position_at_the_end_leaves_an_empty_span() -> None:
    assert remaining_span(10, 4, 2, False, 2) == (10, 10)
    assert batches_per_rank(span_length((10, 10), 10), 4, 3, False) == 0
    assert remaining_span(10, 4, 2, False, 1) == (8, 10)


def test_a_span_outside_the_epoch_is_refused() -> None:
    with pytest.raises(ValueError, match="span"):
        remaining_span(10, 4, 2, False, 0, (4, 12))
    with pytest.raises(ValueError, match="position"):
        remaining_span(10, 4, 2, False, -1)
