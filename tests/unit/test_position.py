"""The client's position and its transitions: pure, no server (the plan arithmetic is test_replan's)."""

from __future__ import annotations

import pytest

from stoker.client.protocol.job import JobSpec
from stoker.client.protocol.plan import batches_per_rank, remaining_span
from stoker.client.runtime.position import Position, SavedPosition

SAMPLES = 48
"""The dataset size the servers would report."""


def position(world_size: int = 3, batch_size: int = 4, drop_last: bool = False) -> Position:
    return Position(JobSpec("demo", batch_size=batch_size, world_size=world_size, drop_last=drop_last))


def whole(world_size: int = 3, batch_size: int = 4, drop_last: bool = False) -> int:
    return batches_per_rank(SAMPLES, batch_size, world_size, drop_last)


def test_a_new_position_is_the_first_batch_of_epoch_zero() -> None:
    at = position()
    assert (at.epoch, at.next_batch, at.span, at.replan_pending) == (0, 0, None, False)
    assert at.saved() == SavedPosition(0, 0, None, 3)
    assert at.batches(SAMPLES, whole()) == whole() == 4


def test_advancing_then_finishing_an_epoch() -> None:
    at = position()
    at.advance_past(0, 0)
    at.advance_past(0, 1)
    assert at.saved() == SavedPosition(0, 2, None, 3)
    at.finish_epoch(0)
    assert at.saved() == SavedPosition(1, 0, None, 3)


def test_selecting_another_epoch_restarts_it_and_the_same_one_keeps_a_resumed_position() -> None:
    at = position()
    at.resume(SavedPosition(2, 3, None, 3))
    at.select_epoch(2)
    assert at.saved() == SavedPosition(2, 3, None, 3), "set_epoch at the top of a loop keeps load_state_dict's"
    at.select_epoch(5)
    assert at.saved() == SavedPosition(5, 0, None, 3)
    for bad in (-1, 1.0, "2"):
        with pytest.raises(ValueError, match="epoch="):
            at.select_epoch(bad)  # type: ignore[arg-type]


def test_resuming_on_as_many_ranks_keeps_the_position_and_its_span() -> None:
    at = position()
    at.resume(SavedPosition(4, 1, (12, 48), 3))
    assert (at.epoch, at.next_batch, at.span, at.replan_pending) == (4, 1, (12, 48), False)
    assert at.batches(SAMPLES, whole()) == batches_per_rank(36, 4, 3, False) == 3
    at.advance_past(4, 1)
    assert at.span == (12, 48), "advancing stays inside the resumed part"
    at.finish_epoch(4)
    assert (at.epoch, at.span) == (5, None), "the next epoch is whole again"


def test_a_state_saved_before_any_batch_needs_no_replan_on_any_world_size() -> None:
    at = position(world_size=3)
    at.resume(SavedPosition(2, 0, None, 5))
    assert not at.replan_pending
    assert at.saved() == SavedPosition(2, 0, None, 3)


def test_resuming_on_another_world_size_waits_for_the_dataset_size_then_plans_the_rest() -> None:
    at = position(world_size=3)
    at.resume(SavedPosition(1, 2, None, 2))
    assert at.replan_pending and (at.epoch, at.next_batch, at.span) == (1, 0, None)
    with pytest.raises(RuntimeError, match="apply_replan"):
        at.saved()
    at.apply_replan(SAMPLES)
    span = remaining_span(SAMPLES, 4, 2, False, 2)
    assert span == (16, 48)
    assert at.saved() == SavedPosition(1, 0, span, 3)
    assert at.batches(SAMPLES, whole()) == batches_per_rank(32, 4, 3, False) == 3
    at.apply_replan(SAMPLES)  # nothing pending: nothing changes
    assert at.saved() == SavedPosition(1, 0, span, 3)


def test_a_replan_of_a_resumed_span_is_a_span_of_that_span() -> None:
    at = position(world_size=1)
    at.resume(SavedPosition(0, 1, (16, 48), 3))
    at.apply_replan(SAMPLES)
    assert at.span == remaining_span(SAMPLES, 4, 3, False, 1, (16, 48)) == (28, 48)


def test_a_replan_with_nothing_left_moves_to_the_next_epoch() -> None:
    at = position(world_size=2)
    at.resume(SavedPosition(3, whole(world_size=3), None, 3))  # saved after the epoch's last batch
    at.apply_replan(SAMPLES)
    assert at.saved() == SavedPosition(4, 0, None, 2)


def test_selecting_another_epoch_drops_a_pending_replan() -> None:
    at = position(world_size=3)
    at.resume(SavedPosition(1, 2, None, 2))
    at.select_epoch(1)
    assert at.replan_pending, "the same epoch: still to be re-planned"
    at.select_epoch(2)
    assert not at.replan_pending and at.saved() == SavedPosition(2, 0, None, 3)
