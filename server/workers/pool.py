"""The worker pool: starts, watches, replaces, grows and shrinks worker processes.

The pool only does process mechanics and reports events; the engine decides what to run where. Each
worker has its own pipe, so the pool always knows which tasks a worker holds and can hand them back
when it dies. Workers fork from a forkserver that has already imported torch and the decoders, so a
replacement is ready in milliseconds and never inherits the server's threads or sockets.

A worker that dies while serving is replaced at once; one that dies before it reported ready is
replaced after a capped exponential backoff (:mod:`.restarts`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import Synchronized
from typing import Any, Generic, Protocol, TypeVar

from stoker.server.workers.messages import (
    Forget,
    Message,
    Ready,
    StartFailed,
    Stop,
    TaskMessage,
    TaskResult,
    WorkerSetup,
)
from stoker.server.workers.process import worker_main
from stoker.server.workers.restarts import RestartBackoff, StartFailures

__all__ = ["WorkerHandle", "WorkerPool", "TaskDone", "WorkerDied", "PoolEvent"]

log = logging.getLogger(__name__)


class _HasTaskId(Protocol):
    task_id: int


T = TypeVar("T", bound=_HasTaskId)

_context = multiprocessing.get_context("forkserver")
CONTEXT = _context
"""Where the pool's processes and shared values come from (the arena's pointer must match)."""
_PRELOAD = ["stoker.server.imaging.render", "stoker.server.workers.process"]


@dataclass(eq=False)
class WorkerHandle(Generic[T]):
    """A worker process, its pipe, its shared progress cell and the tasks it holds (oldest first)."""

    worker_id: int
    process: BaseProcess
    conn: Connection
    progress: Synchronized
    started_at: float
    tasks: deque[T] = field(default_factory=deque)
    ready: bool = False
    retiring: bool = False
    stop_sent: bool = False
    busy_s: float = 0.0
    """Seconds spent on tasks, for the busy share in ``/status``."""
    task_started_at: float | None = None


@dataclass(frozen=True, slots=True)
class TaskDone(Generic[T]):
    """A worker finished its oldest task."""

    worker: WorkerHandle[T]
    task: T
    result: TaskResult
    seconds: float = 0.0
    """The worker's time on this task (from its start or the previous task's end): what fair shares
    and capacity count."""


@dataclass(frozen=True, slots=True)
class WorkerDied(Generic[T]):
    """A worker exited unexpectedly. ``position`` indexes the sample it was on in ``tasks[0]``."""

    worker: WorkerHandle[T]
    exitcode: int | None
    tasks: list[T]
    position: int


PoolEvent = TaskDone[Any] | WorkerDied[Any]


class WorkerPool(Generic[T]):
    """``size`` worker processes; call :meth:`handle` when one of :meth:`fds` is readable."""

    def __init__(
        self,
        size: int,
        setup: WorkerSetup,
        start_timeout_s: float,
        backoff: RestartBackoff,
    ) -> None:
        if size < 1:
            raise ValueError(f"{size=} must be >= 1")
        self.target_size = size
        self.setup = setup
        self.start_timeout_s = start_timeout_s
        self.restarts = 0
        self._failures = StartFailures(backoff)
        self.workers: list[WorkerHandle[T]] = []
        self._ids = itertools.count()
        self._by_fd: dict[int, WorkerHandle[T]] = {}

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the workers and wait until every one reports ready; raise if one cannot start."""
        # Import torch and the decoders once in the forkserver; every worker forks with them loaded.
        _context.set_forkserver_preload(_PRELOAD)
        for _ in range(self.target_size):
            self._spawn()
        deadline = time.monotonic() + self.start_timeout_s
        while not all(worker.ready for worker in self.workers):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"workers not ready within start_timeout_s={self.start_timeout_s}")
            for worker in list(self.workers):
                if not worker.ready and worker.conn.poll(min(remaining, 0.05)):
                    message = worker.conn.recv()
                    if not isinstance(message, Ready):
                        reason = message.reason if isinstance(message, StartFailed) else repr(message)
                        raise RuntimeError(f"worker {worker.worker_id} failed to start: {reason}")
                    worker.ready = True
                elif not worker.process.is_alive():
                    raise RuntimeError(f"worker {worker.worker_id} exited at start (code {worker.process.exitcode})")
        log.info("worker pool ready: %d workers", len(self.workers))

    def _spawn(self) -> WorkerHandle[T]:
        parent, child = _context.Pipe(duplex=True)
        progress = _context.Value("q", -1, lock=False)
        worker_id = next(self._ids)
        process = _context.Process(
            target=worker_main,
            args=(child, progress, self.setup),
            name=f"stoker-worker-{worker_id}",
            daemon=True,
        )
        process.start()
        child.close()
        handle: WorkerHandle[T] = WorkerHandle(worker_id, process, parent, progress, time.monotonic())
        self.workers.append(handle)
        self._by_fd[parent.fileno()] = handle
        self._by_fd[process.sentinel] = handle
        return handle

    def resize(self, size: int) -> None:
        """Grow now, or mark surplus workers to retire once their tasks are done."""
        if size < 1:
            raise ValueError(f"{size=} must be >= 1")
        self.target_size = size
        active = [w for w in self.workers if not w.retiring]
        owed = self._failures.limit(size - len(active))
        for _ in range(size - len(active) - owed):
            self._spawn()
        # Retire the least loaded workers first; they stop as soon as they hold no task.
        for worker in sorted(active, key=lambda w: len(w.tasks))[: max(0, len(active) - size)]:
            worker.retiring = True
        self._stop_idle_retirees()

    def _stop_idle_retirees(self) -> None:
        # Ask; the sentinel reports the exit, so the engine thread never blocks on a join here.
        for worker in self.workers:
            if worker.retiring and not worker.tasks and not worker.stop_sent:
                with contextlib.suppress(OSError):
                    worker.conn.send(Stop())
                worker.stop_sent = True
                log.info("worker %d retiring", worker.worker_id)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop every worker: ask, wait ``timeout_s``, then terminate, then kill."""
        for worker in self.workers:
            with contextlib.suppress(OSError):
                worker.conn.send(Stop())
        deadline = time.monotonic() + timeout_s
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        for step, action in (("terminate", "terminate"), ("kill", "kill")):
            alive = [w for w in self.workers if w.process.is_alive()]
            if not alive:
                break
            log.warning("%d workers still alive after stop; sending %s", len(alive), step)
            for worker in alive:
                getattr(worker.process, action)()
            for worker in alive:
                worker.process.join(1.0)
        for worker in self.workers:
            worker.conn.close()
        self.workers.clear()
        self._by_fd.clear()

    # -- events ----------------------------------------------------------------------------------

    def fds(self) -> list[int]:
        """File descriptors to poll: each worker's pipe and process sentinel."""
        return list(self._by_fd)

    def handle(self, fd: int) -> list[PoolEvent]:
        """Read what ``fd`` has to say; return the resulting events."""
        worker = self._by_fd.get(fd)
        if worker is None:
            return []
        events: list[PoolEvent] = []
        try:
            while worker.conn.poll(0):
                event = self._on_message(worker, worker.conn.recv())
                if event is not None:
                    events.append(event)
        except (EOFError, OSError):
            pass  # the pipe closed: the sentinel reports the death
        if not worker.process.is_alive() and worker in self.workers:
            events.append(self._on_death(worker))
        self._stop_idle_retirees()
        return events

    def _on_message(self, worker: WorkerHandle[T], message: object) -> PoolEvent | None:
        kind = getattr(message, "kind", None)
        if kind is Message.RESULT and isinstance(message, TaskResult):
            expected = worker.tasks[0].task_id if worker.tasks else None
            if message.task_id != expected:
                # A worker out of step with its pipe cannot be trusted with the slots: replace it,
                # and its death hands every task it held back to the engine.
                log.error(
                    "worker %d answered task %s while holding %s; killing it",
                    worker.worker_id,
                    message.task_id,
                    expected,
                )
                worker.process.kill()
                return None
            task = worker.tasks.popleft()
            return TaskDone(worker, task, message, self._account(worker))
        if kind is Message.READY and isinstance(message, Ready):
            worker.ready = True
            self._failures.started(worker.worker_id)
            log.info("worker %d ready (pid %s)", worker.worker_id, message.pid)
            return None
        if kind is Message.START_FAILED and isinstance(message, StartFailed):
            self._failures.said(message.reason)
            log.error("worker %d failed to start: %s\n%s", worker.worker_id, message.reason, message.traceback)
            return None
        log.error("worker %d sent an unknown message %r; ignoring it", worker.worker_id, type(message).__name__)
        return None

    def _account(self, worker: WorkerHandle[T]) -> float:
        """Count the task just finished as busy time; returns its seconds."""
        now = time.monotonic()
        seconds = 0.0
        if worker.task_started_at is not None:
            seconds = now - worker.task_started_at
            worker.busy_s += seconds
        worker.task_started_at = now if worker.tasks else None
        return seconds

    def _on_death(self, worker: WorkerHandle[T]) -> WorkerDied[T]:
        worker.process.join(0)
        position = int(worker.progress.value)
        tasks = list(worker.tasks)
        self._forget(worker)
        worker.conn.close()
        if worker.retiring and not tasks:
            log.info("worker %d retired", worker.worker_id)
        else:
            log.warning(
                "worker %d (pid %s) died with exit code %s holding %d tasks",
                worker.worker_id,
                worker.process.pid,
                worker.process.exitcode,
                len(tasks),
            )
        if not worker.retiring:
            self.restarts += 1
            if worker.ready:
                self._spawn()
            else:
                self._failures.failed(worker.worker_id, worker.process.exitcode)
        return WorkerDied(worker, worker.process.exitcode, tasks, position)

    def respawn_due(self, now: float) -> None:
        """Start the replacements owed for workers that failed to start, once their backoff is over."""
        for _ in range(self._failures.due(now)):
            self._spawn()

    @property
    def problem(self) -> str | None:
        """Why the pool cannot serve as sized: workers failing to start, repeatedly (``None``: fine)."""
        return self._failures.problem

    @property
    def start_failures(self) -> int:
        """Workers that failed to start, in a row (0 once one starts)."""
        return self._failures.count

    def _forget(self, worker: WorkerHandle[T]) -> None:
        self.workers.remove(worker)
        self._by_fd = {fd: w for fd, w in self._by_fd.items() if w is not worker}

    def kill_stuck(self, timeout_s: float) -> None:
        """SIGKILL workers on one task for longer than ``timeout_s`` (a hung decoder is a dead one)."""
        now = time.monotonic()
        for worker in self.workers:
            started = worker.task_started_at
            if started is not None and now - started > timeout_s and worker.process.is_alive():
                log.warning("worker %d stuck on a task for %.1f s; killing it", worker.worker_id, now - started)
                worker.process.kill()
                worker.task_started_at = None  # its death, reported by the sentinel, redoes the task

    # -- work ------------------------------------------------------------------------------------

    def available(self, depth: int) -> list[WorkerHandle[T]]:
        """Ready, non-retiring workers holding fewer than ``depth`` tasks, least loaded first."""
        ready = [w for w in self.workers if w.ready and not w.retiring and len(w.tasks) < depth]
        return sorted(ready, key=lambda w: len(w.tasks))

    def submit(self, worker: WorkerHandle[T], task: T, message: TaskMessage) -> None:
        """Send ``message`` and record ``task`` as held; their ``task_id`` must agree."""
        if message.task_id != task.task_id:
            raise ValueError(f"message for task {message.task_id} submitted as task {task.task_id}")
        worker.conn.send(message)
        if not worker.tasks:
            worker.task_started_at = time.monotonic()
        worker.tasks.append(task)

    def forget_slot(self, name: str) -> None:
        """Tell every live worker to unmap slot ``name`` (the engine destroyed it)."""
        for worker in self.workers:
            with contextlib.suppress(OSError):
                worker.conn.send(Forget(name))
