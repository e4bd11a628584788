"""Fair shares of worker time between jobs, and between the ranks of a job (engine thread).

Weighted fair queuing: each job has a virtual time, the worker-seconds its tasks used divided by its
weight. The next batch to cut into tasks is the one of the job with the least virtual time (counting
what it has out at its measured cost per sample), so over contended time each job's share of worker
time is its weight among the jobs that have work. Within that job, the batch of the rank furthest
behind goes first (lowest epoch and batch number), so no rank falls behind its peers: DDP steps
together. A job that asks for nothing gets nothing reserved; one that arrives (or comes back) starts
at the least virtual time of the jobs already busy, so it neither banks credit while idle nor waits
for a greedy job's queue to drain.

A job's weight is its dataset's declared ``weight`` (a mixture plugs its own in with
:meth:`Weights.declare`), lowered, never raised, by what its clients ask for.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

from stoker.server.engine.jobs import OpenJob
from stoker.server.engine.records import BatchWork, Task

__all__ = ["Weights", "FairQueue", "DEFAULT_WEIGHT"]

DEFAULT_WEIGHT = 1.0
_FIRST_COST_S = 0.005
"""Seconds per sample assumed until a job's first task is measured."""
_SMOOTHING = 0.2


class Weights:
    """Declared weights by dataset (or mixture) name, and what each job's clients asked for."""

    def __init__(self, declared: Mapping[str, float] | None = None) -> None:
        self._declared: dict[str, float] = {}
        self._asked: dict[str, float] = {}
        for name, weight in (declared or {}).items():
            self.declare(name, weight)

    def declare(self, name: str, weight: float) -> None:
        """The operator's weight for jobs on ``name`` (a dataset or a mixture)."""
        if not weight > 0:
            raise ValueError(f"weight={weight!r} of {name!r} must be > 0")
        self._declared[name] = float(weight)

    def declared(self, name: str) -> float:
        """The weight declared for ``name`` (1 when none is)."""
        return self._declared.get(name, DEFAULT_WEIGHT)

    def ask(self, job_id: str, weight: float | None) -> None:
        """A client of ``job_id`` asked for ``weight`` (the latest ask holds)."""
        if weight is not None and weight > 0:
            self._asked[job_id] = float(weight)

    def of(self, job: OpenJob) -> float:
        """The job's weight: as declared, or less if its clients asked for less."""
        declared = self.declared(job.spec.dataset)
        return min(declared, self._asked.get(job.job_id, declared))


class FairQueue:
    """Which queued batch to cut next, and the accounts that decide it."""

    def __init__(self, weights: Weights, window_s: float = 10.0) -> None:
        self.weights = weights
        self.window_s = window_s
        self._virtual: dict[str, float] = {}
        """Worker-seconds used over weight, per job."""
        self._out: dict[str, float] = {}
        """Estimated worker-seconds of the tasks a job has out."""
        self._estimates: dict[int, tuple[str, float]] = {}
        """Task id -> (job, its estimated seconds)."""
        self._cost: dict[str, float] = {}
        """Seconds per sample, per job (smoothed)."""
        self._busy: set[str] = set()
        """Jobs with work at the last pick."""
        self._used: deque[tuple[float, str, float]] = deque()
        """``(when, job, seconds)`` over the window: the shares ``/status`` shows."""
        self._recent: dict[str, float] = {}
        """Worker-seconds per job over the window (the sums of :attr:`_used`)."""

    # -- choosing --------------------------------------------------------------------------------

    def pick(self, queue: Iterable[BatchWork]) -> BatchWork | None:
        """The queued batch to cut next: the least-served job's, its rank furthest behind."""
        by_job: dict[str, BatchWork] = {}
        jobs: dict[str, OpenJob] = {}
        for work in queue:
            job_id = work.key[0]
            best = by_job.get(job_id)
            if best is None or _behind(work) < _behind(best):
                by_job[job_id] = work
                jobs[job_id] = work.job
        if not by_job:
            return None
        busy = set(by_job) | {job for job, out in self._out.items() if out > 0}
        floor = min((self._virtual.get(j, 0.0) for j in self._busy & busy), default=None)
        for job_id in by_job.keys() - self._busy:
            # Arriving (or back): start level with the busy jobs, no credit banked, none owed.
            if floor is not None:
                self._virtual[job_id] = max(self._virtual.get(job_id, 0.0), floor)
        self._busy = busy
        chosen = min(by_job, key=lambda j: self._key(j, jobs[j]))
        return by_job[chosen]

    def _key(self, job_id: str, job: OpenJob) -> tuple[float, float]:
        weight = self.weights.of(job)
        # Ties (a newcomer lifted level with the busy jobs) go to the job that used the least lately.
        return self._virtual.get(job_id, 0.0) + self._out.get(job_id, 0.0) / weight, self._recent.get(job_id, 0.0)

    # -- accounts --------------------------------------------------------------------------------

    def cut(self, task: Task) -> None:
        """``task`` was cut: count its estimated cost as out."""
        job_id = task.work.key[0]
        estimate = len(task.samples) * self._cost.get(job_id, _FIRST_COST_S)
        self._estimates[task.task_id] = (job_id, estimate)
        self._out[job_id] = self._out.get(job_id, 0.0) + estimate

    def done(self, task: Task, seconds: float, now: float) -> None:
        """A worker spent ``seconds`` on ``task``: charge its job; learn its cost per sample."""
        job_id, estimate = self._estimates.pop(task.task_id, (task.work.key[0], 0.0))
        self._out[job_id] = max(0.0, self._out.get(job_id, 0.0) - estimate)
        if seconds <= 0:
            return
        weight = self.weights.of(task.work.job)
        self._virtual[job_id] = self._virtual.get(job_id, 0.0) + seconds / weight
        if task.samples:
            per_sample = seconds / len(task.samples)
            old = self._cost.get(job_id)
            self._cost[job_id] = per_sample if old is None else old + _SMOOTHING * (per_sample - old)
        self._used.append((now, job_id, seconds))
        self._recent[job_id] = self._recent.get(job_id, 0.0) + seconds
        self._trim(now)

    def dropped(self, task: Task) -> None:
        """``task`` will not run (its batch failed, or its rows wait for another task)."""
        job_id, estimate = self._estimates.pop(task.task_id, (task.work.key[0], 0.0))
        self._out[job_id] = max(0.0, self._out.get(job_id, 0.0) - estimate)

    def _trim(self, now: float) -> None:
        while self._used and self._used[0][0] < now - self.window_s:
            _, job_id, seconds = self._used.popleft()
            left = self._recent[job_id] - seconds
            if left <= 1e-9:
                del self._recent[job_id]
            else:
                self._recent[job_id] = left

    def shares(self, now: float) -> dict[str, float]:
        """Each job's share of the worker time used over the window."""
        self._trim(now)
        total = sum(self._recent.values())
        return {job_id: seconds / total for job_id, seconds in self._recent.items()} if total > 0 else {}


def _behind(work: BatchWork) -> tuple[int, int, float, int]:
    """Order of a job's batches: lowest epoch and batch number first (the rank furthest behind)."""
    _, epoch, rank, k = work.key
    return epoch, k, work.created_at, rank
