"""The decoded-sample arena in-process: reserving under a budget, writing once, reading in place."""

from __future__ import annotations

import numpy as np

from stoker.server.workers.arena import Arena, ArenaView
from stoker.server.workers.pool import CONTEXT


def test_entries_are_reserved_within_the_budget_and_read_back_in_place() -> None:
    with Arena(4096, CONTEXT) as arena:
        view = ArenaView(arena.handle)
        try:
            pixels = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
            first = view.reserve(pixels.nbytes)
            assert first == 0
            view.write(first, pixels)
            second = view.reserve(pixels.nbytes)
            assert second is not None and second % 64 == 0 and second >= pixels.nbytes
            back = view.read(first, (10, 12, 3))
            assert np.array_equal(back, pixels) and not back.flags.writeable
            assert view.reserve(4096) is None, "past the budget: nothing, not an error"
            assert arena.used == second + 384 and arena.used <= arena.size
        finally:
            view.close()
