"""The measurement model of demo and bench: the median run, the spread, timed windows, /proc walks."""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Iterator

import pytest

from stoker.server.tools.measure import Run, Series, Stream, cpu_seconds, memory_mb, process_tree, timed_window

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
NO_SUCH_PID = 2**22 + 1  # above the kernel's largest pid_max


def _run(images: int, wall_s: float = 1.0, waited_s: float | None = None) -> Run:
    return Run(images, nbytes=images * 1000, wall_s=wall_s, cpu_s=wall_s / 2, waited_s=waited_s)


def test_median_is_one_run_and_the_lower_middle_for_an_even_count() -> None:
    odd = Series("odd", [_run(300), _run(100), _run(200, waited_s=0.5)])
    assert odd.median() == _run(200, waited_s=0.5)  # every figure from that one run
    even = Series("even", [_run(400), _run(100), _run(300), _run(200)])
    assert even.median().images == 200
    assert even.spread() == (100.0, 400.0)
    # Ranked by images/s, not by images: a longer window with more images can be the slower one.
    assert Series("rate", [_run(100, wall_s=0.5), _run(150, wall_s=1.0), _run(90, wall_s=1.0)]).median().images == 150


def test_as_dict_reports_the_median_run_and_every_run() -> None:
    report = Series("x", [_run(100), _run(300), _run(200)], note="n").as_dict()
    assert report["images_per_s"] == {"median": 200.0, "min": 100.0, "max": 300.0}
    assert report["mb_per_s"] == pytest.approx(0.2)
    assert report["cpu_s_per_1000_images"] == pytest.approx(2.5)
    assert len(report["runs"]) == 3 and report["note"] == "n" and report["label"] == "x"


def test_empty_series_and_degenerate_runs() -> None:
    with pytest.raises(ValueError, match="no runs"):
        Series("empty").median()
    zero = Run(0, 0, 0.0, 0.0)
    assert (zero.images_per_s, zero.mb_per_s, zero.cpu_s_per_1000, zero.stall_share) == (0.0, 0.0, 0.0, None)
    assert _run(10, wall_s=1.0, waited_s=2.0).stall_share == 1.0


def _stream(batch: int = 8, waited: list[float] | None = None, cpu_per_batch_s: float = 0.0) -> Stream:
    def counts() -> Iterator[tuple[int, int]]:
        while True:
            if waited is not None:
                waited[0] += 0.01
            started = time.process_time()
            while time.process_time() - started < cpu_per_batch_s:  # a loader working on this core
                pass
            yield batch, batch * 10

    return Stream(counts(), batches_per_epoch=3, waited_s=None if waited is None else lambda: waited[0])


def test_window_of_n_batches_counts_exactly_those() -> None:
    waited = [5.0]  # a running total from before the window: only the window's share counts
    stream = _stream(waited=waited, cpu_per_batch_s=0.03)
    run = timed_window(stream, batches=2 * stream.batches_per_epoch, warmup_batches=1)
    assert (run.images, run.nbytes) == (48, 480)
    assert run.waited_s == pytest.approx(0.06)
    # Six batches of 30 ms of CPU each, on one thread: the window's CPU time, within a clock tick or two.
    assert 6 * 0.03 - 0.03 <= run.cpu_s <= run.wall_s + 0.03


def test_window_of_seconds_ends_with_the_batch_that_crosses_the_line() -> None:
    ticks = itertools.count(0.0, 0.25)
    run = timed_window(_stream(), seconds=1.0, clock=lambda: next(ticks))
    assert run.images == 4 * 8 and run.wall_s == 1.0 and run.waited_s is None


@pytest.mark.parametrize("window", [{}, {"seconds": 1.0, "batches": 2}, {"seconds": 0.0}, {"batches": 0}], ids=str)
def test_window_needs_exactly_one_positive_end(window: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        timed_window(_stream(), **window)  # type: ignore[arg-type]


@linux_only
def test_process_tree_walks_this_process_and_skips_missing_ones() -> None:
    assert next(process_tree(os.getpid())) == os.getpid()
    assert list(process_tree(NO_SUCH_PID)) == []
    assert cpu_seconds() > 0 and cpu_seconds(NO_SUCH_PID) == 0.0
    pss, rss = memory_mb(os.getpid()), memory_mb(os.getpid(), "Rss")
    assert 0 < pss <= rss
    assert memory_mb(NO_SUCH_PID) == 0.0
    with pytest.raises(ValueError, match="field"):
        memory_mb(os.getpid(), "Swap")
