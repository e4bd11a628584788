"""Production: batches from request to finished slot.

A wanted batch is planned (known bad samples already replaced), waits for a shared-memory slot, is
cut into tasks of a few rows and handed to workers. Results fill the rows; a bad sample gets its
stand-in as a new task at the head of the line; a sample that kills workers is quarantined; a dead
worker's tasks are redone first. When a batch is finished (every row written, or given up) it leaves
production: every public method returns the batches it finished, for the engine to deliver.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Iterable

from stoker.client.protocol.wire import ErrorCode
from stoker.server.cache import DecodedCache
from stoker.server.data.mixtures import MixedTable
from stoker.server.engine.fairness import FairQueue, Weights
from stoker.server.engine.jobs import JobRegistry, OpenJob
from stoker.server.engine.records import BatchKey, BatchWork, Task
from stoker.server.engine.standins import BadSamplePolicy, BatchPlanner
from stoker.server.engine.stats import EngineStats
from stoker.server.engine.targets import raw_targets
from stoker.server.imaging.pipelines import Pipeline
from stoker.server.workers.messages import Outcome, SampleResult, SampleSpec, TaskMessage
from stoker.server.workers.pool import PoolEvent, TaskDone, WorkerDied, WorkerPool
from stoker.server.workers.slots import SlotPool

__all__ = ["Production", "KILLS_BEFORE_QUARANTINE"]

log = logging.getLogger(__name__)
KILLS_BEFORE_QUARANTINE = 2
_MAX_ROWS_PER_TASK = 16


def cache_entry(job: OpenJob, index: int) -> tuple[str, int, int]:
    """``(dataset, index in it, its size)`` of a row's sample: a mixture's rows are cached per source."""
    table = job.table
    if isinstance(table, MixedTable):
        return table.cache_key(index)
    return table.name, index, len(table)


def decode_rule(job: OpenJob, samples: list[tuple[int, int]]) -> int:
    """The ``min_side`` of a task's rows: its dataset's, or (a mixture's task holds one source) its source's."""
    table = job.table
    if isinstance(table, MixedTable) and samples:
        return table.min_side(samples[0][1])
    return job.min_side


def source_pipeline(job: OpenJob, samples: list[tuple[int, int]]) -> Pipeline:
    """The pipeline of a task's rows: the job's, or its source's own in a mixture that declares one."""
    table = job.table
    own = table.pipeline(samples[0][1]) if isinstance(table, MixedTable) and samples else None
    return own if own is not None else job.pipeline


def source_groups(work: BatchWork, rows: list[int]) -> list[list[int]]:
    """``rows`` in groups of one source each (one group for a dataset)."""
    table = work.job.table
    if not isinstance(table, MixedTable):
        return [rows]
    sources = table.source_of(work.indices[rows])
    return [[row for row, s in zip(rows, sources, strict=True) if s == source] for source in sorted(set(sources))]


_OUTCOME_LABELS = {
    Outcome.OK: "ok",
    Outcome.BAD: "bad",
    Outcome.FAILED: "failed",
    Outcome.PIPELINE: "pipeline",
    Outcome.UNAVAILABLE: "unavailable",
}


class Production:
    """Every batch being produced, from planning to its last row."""

    def __init__(
        self,
        pool: WorkerPool[Task],
        slots: SlotPool,
        jobs: JobRegistry,
        planner: BatchPlanner,
        stats: EngineStats,
        cache: DecodedCache,
        fair: FairQueue | None = None,
    ) -> None:
        self.fair = fair if fair is not None else FairQueue(Weights())
        """Which queued batch is cut next (weighted fair shares between jobs and ranks)."""
        self.pool = pool
        self.slots = slots
        self.jobs = jobs
        self.planner = planner
        self.stats = stats
        self.cache = cache
        self._works: dict[BatchKey, BatchWork] = {}
        self._queue: deque[BatchWork] = deque()
        """Planned batches waiting for a slot."""
        self._ready: deque[Task] = deque()
        """Tasks waiting for a worker."""
        self._kills: dict[tuple[str, int], int] = {}
        self._task_ids = itertools.count()
        self._finished: list[BatchWork] = []
        """Batches that left production since a public method last returned."""

    @property
    def in_progress(self) -> int:
        """Batches wanted and not yet finished."""
        return len(self._works)

    # -- wanting and abandoning ------------------------------------------------------------------

    def want(
        self, job: OpenJob, key: BatchKey, identity: bytes, now: float, policy: BadSamplePolicy
    ) -> list[BatchWork]:
        """``identity`` waits for batch ``key``: join its work, or plan it. Returns the batch at once when
        planning already finished it (it failed: a known bad sample under ``on_error = "raise"``).

        A batch that already failed but still has tasks out is not joined: its failure answers those
        who asked before, and a new ask gets a fresh attempt under today's policy (the operator may
        have switched ``on_error`` to ``skip`` meanwhile, or the fault may have passed).
        """
        work = self._works.get(key)
        if work is not None and work.failure is not None:
            work.waiters.pop(identity, None)
            work = None
        if work is None:
            work = self._works[key] = self.planner.plan(job, key, policy)
            if work.failure is None:
                self._queue.append(work)
        work.waiters.setdefault(identity, now)
        self._settle(work)
        return self._take_finished()

    def abandon(self, identity: bytes, keys: Iterable[BatchKey]) -> None:
        """``identity`` no longer waits for ``keys``; drop queued batches nobody wants any more."""
        for key in keys:
            work = self._works.get(key)
            if work is None:
                continue
            work.waiters.pop(identity, None)
            if not work.waiters and work.slot is None and work in self._queue:
                # No worker touched it: drop it rather than decode for no one.
                self._queue.remove(work)
                del self._works[key]

    def drain(self) -> list[BatchWork]:
        """Fail every batch no worker has started, so its waiters can go elsewhere at once."""
        while self._queue:
            work = self._queue.popleft()
            work.fail(ErrorCode.SHUTTING_DOWN, "server is shutting down")
            self._settle(work)
        return self._take_finished()

    def _take_finished(self) -> list[BatchWork]:
        finished, self._finished = self._finished, []
        return finished

    # -- dispatch --------------------------------------------------------------------------------

    def dispatch(self, queue_depth: int) -> list[BatchWork]:
        """Give queued batches slots, cut them into tasks and hand tasks to idle workers; returns the
        batches that finished meanwhile (failed ones whose last queued task was dropped)."""
        self._cut(len(self.pool.workers) * queue_depth)
        while self._ready:
            available = self.pool.available(queue_depth)
            if not available:
                break
            for worker in available:
                task = self._next_task()
                if task is None:
                    return self._take_finished()
                message = self._message(task)
                if message is None:  # every row waits for another task's decode
                    task.work.tasks.discard(task)
                    self.fair.dropped(task)
                    continue
                self.pool.submit(worker, task, message)
        return self._take_finished()

    def _cut(self, capacity: int) -> None:
        workers = max(1, len(self.pool.workers))
        while self._queue and len(self._ready) < capacity:
            work = self.fair.pick(self._queue) or self._queue[0]
            slot = self.slots.acquire(work.nbytes)
            if slot is None:
                return  # the shared-memory budget is spent; wait for sends to finish
            self._queue.remove(work)
            work.slot, work.dispatched_at = slot, time.monotonic()
            self.stats.stage("queue", work.dispatched_at - work.created_at)
            rows = sorted(work.pending)
            # Small tasks spread one batch over every worker; a few rows each keep the pipe cheap.
            chunk = max(1, min(_MAX_ROWS_PER_TASK, math.ceil(len(rows) / (2 * workers))))
            for group in source_groups(work, rows):  # a task decodes rows of one source (one decode rule)
                for start in range(0, len(group), chunk):
                    self._enqueue(work, [(row, int(work.indices[row])) for row in group[start : start + chunk]])

    def _enqueue(self, work: BatchWork, samples: list[tuple[int, int]], first: bool = False) -> None:
        task = Task(next(self._task_ids), work, samples)
        work.tasks.add(task)
        self.fair.cut(task)
        if first:
            self._ready.appendleft(task)
        else:
            self._ready.append(task)

    def _next_task(self) -> Task | None:
        while self._ready:
            task = self._ready.popleft()
            if task.work.failure is None:
                return task
            task.work.tasks.discard(task)  # its batch failed meanwhile: nobody needs these rows
            self.fair.dropped(task)
            self._release_claims(task)
            self._settle(task.work)
        return None

    def _message(self, task: Task) -> TaskMessage | None:
        """The task's message: each sample's locator and RNG key, and on a cached dataset its part in
        the decoded-sample cache. Rows whose sample another task is decoding are parked (left out);
        ``None`` when none is left."""
        work = task.work
        if work.slot is None:
            raise RuntimeError("a task of a batch without a slot")  # unreachable: tasks are cut after acquire
        job, epoch = work.job, work.key[1]
        table = job.table
        specs, kept = [], []
        for row, index in task.samples:
            part = None
            name, local, size = cache_entry(job, index)
            if self.cache.serves(name):
                part = self.cache.part(task, (name, local), size, (work, row))
                if part is None:
                    continue
            sample_key = self.jobs.sample_key(job, epoch, index, work.key[2], work.key[3], row)
            specs.append(SampleSpec(row, table.locator(index), sample_key, part, raw_targets(job, index)))
            kept.append((row, index))
        task.samples = kept
        if not specs:
            return None
        pipeline, size = source_pipeline(job, kept), job.spec.image_size
        return TaskMessage(
            task.task_id, work.slot.name, len(work.originals), size, pipeline, tuple(specs), decode_rule(job, kept),
            layout=job.spec.layout, mask_side=job.mask_side, min_box_visibility=job.min_box_visibility,
        )  # fmt: skip

    def _release_claims(self, task: Task, index: int | None = None) -> None:
        """``task`` is done with its cache claims (on sample ``index``, or all): rows parked behind them
        go on, now reading the arena."""
        sample = None if index is None else cache_entry(task.work.job, index)[:2]
        for work, row in self.cache.release(task, sample):
            if work.failure is None and row in work.pending:
                self._enqueue(work, [(row, int(work.indices[row]))], first=True)

    # -- results ---------------------------------------------------------------------------------

    def on_event(self, event: PoolEvent, policy: BadSamplePolicy) -> list[BatchWork]:
        """Apply what the pool reports; returns the batches it finished."""
        if isinstance(event, TaskDone):
            self._on_task_done(event, policy)
        elif isinstance(event, WorkerDied):
            self._on_worker_died(event, policy)
        return self._take_finished()

    def _on_task_done(self, event: TaskDone[Task], policy: BadSamplePolicy) -> None:
        task, result = event.task, event.result
        work = task.work
        work.tasks.discard(task)
        self.fair.done(task, event.seconds, time.monotonic())
        for stage, total, count in result.stages:
            self.stats.stage(stage, total / count, count)
        indices = dict(task.samples)
        for sample in result.samples:
            self.stats.samples_total.labels(_OUTCOME_LABELS[sample.outcome]).inc()
            if work.failure is not None:
                continue
            if sample.outcome is Outcome.OK:
                work.pending.discard(sample.row)
                if sample.targets is not None:
                    work.targets[sample.row] = sample.targets
                if sample.row in indices:
                    name, local, size = cache_entry(work.job, indices[sample.row])
                    if self.cache.serves(name):
                        self.cache.reported((name, local), size, sample.decoded, sample.stored, sample.header)
            elif sample.outcome is Outcome.BAD:
                if self.planner.stand_in(work, sample.row, sample.reason, policy):
                    self._enqueue(work, [(sample.row, int(work.indices[sample.row]))], first=True)
            elif sample.outcome is Outcome.PIPELINE:
                self._fail_in_pipeline(work, sample)
            elif sample.outcome is Outcome.UNAVAILABLE:
                log.error("storage unavailable for batch %s: %s", work.key, sample.reason)
                work.fail(ErrorCode.STORAGE_UNAVAILABLE, f"the dataset's storage cannot be reached: {sample.reason}")
            else:
                self._fail_on_sample(work, sample.row, sample.reason, sample.traceback)
        self._release_claims(task)
        self._settle(work)

    def _fail_on_sample(self, work: BatchWork, row: int, reason: str, trace: str) -> None:
        path = work.job.table.display_path(int(work.indices[row]))
        log.error("worker failed on %s (batch %s): %s\n%s", path, work.key, reason, trace)
        work.fail(ErrorCode.INTERNAL, f"a worker failed on {path}: {reason}", path=path, reason=reason, traceback=trace)

    def _fail_in_pipeline(self, work: BatchWork, sample: SampleResult) -> None:
        index = int(work.indices[sample.row])
        pipeline = source_pipeline(work.job, [(sample.row, index)]).name
        path = work.job.table.display_path(index)
        self.stats.pipeline_failed(pipeline, sample.op, path, sample.reason)
        log.error("pipeline %r, op %r failed on %s: %s\n%s", pipeline, sample.op, path, sample.reason, sample.traceback)
        work.fail(
            ErrorCode.PIPELINE,
            f"pipeline {pipeline!r}: {sample.op} failed on {path}: {sample.reason}",
            path=path,
            reason=sample.reason,
            traceback=sample.traceback,
            op=sample.op,
        )

    def _on_worker_died(self, event: WorkerDied[Task], policy: BadSamplePolicy) -> None:
        if not event.worker.retiring:
            self.stats.restarts_total.inc()
        tasks = event.tasks
        if tasks and 0 <= event.position < len(tasks[0].samples):
            self._count_kill(tasks[0], event.position, event.exitcode, policy)
        # Redo everything the dead worker held, ahead of new work: slots are already reserved.
        for task in reversed(tasks):
            if task.samples and task.work.failure is None:
                self._ready.appendleft(task)  # it keeps its claims: the redo decodes and stores
            else:
                task.work.tasks.discard(task)
                self.fair.dropped(task)
                self._release_claims(task)
                self._settle(task.work)

    def _count_kill(self, task: Task, position: int, exitcode: int | None, policy: BadSamplePolicy) -> None:
        row, index = task.samples[position]
        key = (task.work.job.table.name, index)
        self._kills[key] = kills = self._kills.get(key, 0) + 1
        if kills >= KILLS_BEFORE_QUARANTINE:
            task.samples.remove((row, index))
            self._release_claims(task, index)  # rows waiting on it will meet it as a known bad sample
            work = task.work
            reason = f"quarantined: killed {kills} workers (last exit code {exitcode})"
            if self.planner.stand_in(work, row, reason, policy):
                task.samples.append((row, int(work.indices[row])))

    def _settle(self, work: BatchWork) -> None:
        if not work.finished:
            return
        if self._works.get(work.key) is work:
            del self._works[work.key]
        if work.failure is None and work.slot is None:
            return  # planned, never dispatched, and abandoned: nothing to deliver
        self._finished.append(work)
