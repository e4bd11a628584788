"""The worker pool in-process: real worker processes rendering into real shared-memory slots."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait

import numpy as np
import pytest

from stoker.client.protocol.plan import sample_seed
from stoker.server.data.locators import Locator
from stoker.server.imaging.pipelines import BUILTIN_PIPELINES
from stoker.server.imaging.render import StageTimes, render_sample
from stoker.server.workers.messages import Outcome, SampleSpec, TaskMessage, WorkerSetup
from stoker.server.workers.pool import PoolEvent, TaskDone, WorkerDied, WorkerPool
from stoker.server.workers.restarts import RestartBackoff
from stoker.server.workers.slots import SlotPool
from tests.helpers import DEFAULTS, DEMO_DATA, LIMITS

SIZE = 32
PHOTOS = sorted(DEMO_DATA.rglob("*.jpg"))


@dataclass(eq=False)
class Held:
    """What the engine would keep per task; the pool only needs its id."""

    task_id: int


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool[Held]]:
    setup = WorkerSetup(LIMITS, DEFAULTS.reads_in_flight, DEFAULTS.store_config)
    workers: WorkerPool[Held] = WorkerPool(1, setup, start_timeout_s=120, backoff=RestartBackoff(0.1, 1.0))
    workers.start()
    try:
        yield workers
    finally:
        workers.close()


@pytest.fixture
def slots() -> Iterator[SlotPool]:
    with SlotPool(16 * 2**20) as pool:
        yield pool


def events_until(pool: WorkerPool[Held], wanted: type, timeout_s: float = 60.0) -> list[PoolEvent]:
    """Pool events, read as a poll loop would, until one of type ``wanted`` arrives."""
    deadline = time.monotonic() + timeout_s
    seen: list[PoolEvent] = []
    while not any(isinstance(event, wanted) for event in seen):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {wanted.__name__} within {timeout_s} s (saw {seen})"
        for ready in wait(pool.fds(), timeout=min(remaining, 0.5)):
            fd = ready if isinstance(ready, int) else ready.fileno()
            seen += pool.handle(fd)
    return seen


def wait_ready(pool: WorkerPool[Held], timeout_s: float = 60.0) -> None:
    """Handle pool events, as a poll loop would, until every worker reported ready."""
    deadline = time.monotonic() + timeout_s
    while not all(w.ready for w in pool.workers):
        assert time.monotonic() < deadline, f"workers not ready within {timeout_s} s"
        for ready in wait(pool.fds(), timeout=0.5):
            pool.handle(ready if isinstance(ready, int) else ready.fileno())


def task_for(slot_name: str, task_id: int, paths: list[bytes]) -> TaskMessage:
    samples = tuple(
        SampleSpec(row, Locator(os.fsdecode(path)), sample_seed(1, 0, row)) for row, path in enumerate(paths)
    )
    return TaskMessage(task_id, slot_name, len(paths), SIZE, BUILTIN_PIPELINES["train"], samples)


def test_a_task_fills_its_rows_and_reports_each_sample(pool, slots) -> None:
    slot = slots.acquire(2 * SIZE * SIZE * 3)
    assert slot is not None
    paths = [os.fsencode(PHOTOS[0]), b"/no/such/file.jpg"]
    submitted = time.perf_counter()
    pool.submit(pool.available(2)[0], Held(7), task_for(slot.name, 7, paths))
    (done,) = [e for e in events_until(pool, TaskDone) if isinstance(e, TaskDone)]
    wall_s = time.perf_counter() - submitted
    assert done.task.task_id == done.result.task_id == 7
    ok, bad = done.result.samples
    assert ok.outcome is Outcome.OK and bad.outcome is Outcome.BAD and "cannot read" in bad.reason
    expected = np.zeros((SIZE, SIZE, 3), np.uint8)
    render_sample(paths[0], sample_seed(1, 0, 0), BUILTIN_PIPELINES["train"], SIZE, expected, LIMITS, StageTimes())
    row = np.frombuffer(slot.view(SIZE * SIZE * 3), np.uint8).reshape(SIZE, SIZE, 3)
    assert np.array_equal(row, expected), "the worker wrote the same bytes as rendering in-process"
    stages = {stage: (seconds, count) for stage, seconds, count in done.result.stages}
    # Both samples were read; only the good one was decoded, resized and counted as augmented.
    assert stages["read"][1] == 2 and stages["decode"][1] == stages["geometry"][1] == stages["augment"][1] == 1
    assert all(seconds > 0 for seconds, _ in stages.values()), stages
    worked = stages["decode"][0] + stages["augment"][0]
    assert worked < wall_s, f"the worker's stage times ({worked:.4f} s) fit in the task's wall time ({wall_s:.4f} s)"


def test_a_task_and_its_message_must_agree_on_the_id(pool, slots) -> None:
    slot = slots.acquire(SIZE * SIZE * 3)
    assert slot is not None
    with pytest.raises(ValueError, match="task 3 submitted as task 4"):
        pool.submit(pool.available(2)[0], Held(4), task_for(slot.name, 3, [os.fsencode(PHOTOS[0])]))


def test_a_killed_worker_hands_back_its_tasks_and_is_replaced(pool, slots) -> None:
    slot = slots.acquire(SIZE * SIZE * 3)
    assert slot is not None
    worker = pool.available(2)[0]
    held = Held(11)
    restarts = pool.restarts
    os.kill(worker.process.pid, signal.SIGSTOP)  # hold it mid-task so the kill finds the task held
    pool.submit(worker, held, task_for(slot.name, 11, [os.fsencode(PHOTOS[1])]))
    os.kill(worker.process.pid, signal.SIGKILL)
    died = [e for e in events_until(pool, WorkerDied) if isinstance(e, WorkerDied)]
    assert died[0].tasks == [held] and died[0].exitcode == -signal.SIGKILL
    assert pool.restarts == restarts + 1 and worker not in pool.workers and len(pool.workers) == 1
    wait_ready(pool)  # the replacement reports ready through its pipe


def test_shrinking_retires_a_worker_without_counting_a_restart(pool) -> None:
    pool.resize(2)
    wait_ready(pool)
    restarts = pool.restarts
    pool.resize(1)
    retiring = [w for w in pool.workers if w.retiring]
    assert len(retiring) == 1
    events_until(pool, WorkerDied)
    assert pool.restarts == restarts and len(pool.workers) == 1 and not pool.workers[0].retiring


def test_restart_backoff_doubles_from_its_first_wait_up_to_its_cap() -> None:
    backoff = RestartBackoff(0.5, 30.0)
    assert [backoff.delay(n) for n in range(1, 9)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff.delay(10_000) == 30.0
