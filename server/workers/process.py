"""The worker process: decodes and augments the samples of tasks into shared batch slots.

```mermaid
stateDiagram-v2
    [*] --> starting
    starting --> failed: init raised (StartFailed sent)
    starting --> idle: init done (Ready sent)
    idle --> busy: TaskMessage
    busy --> idle: TaskResult sent (one SampleResult per sample)
    idle --> idle: Forget (unmap a destroyed slot)
    idle --> [*]: Stop, or the pipe closed (the server is gone)
    failed --> [*]
```

A worker holds no dataset: each task carries the paths and RNG keys of its samples, so a worker can
be killed and replaced at any moment and its tasks redone elsewhere with identical bytes. Before each
sample it writes the sample's position to ``progress``, shared with the engine, which is how a sample
that kills workers is identified.

A sample's failure is classified here, where the exception is: :class:`BadImage` (and running out of
memory on one huge file) is the file's fault and makes the sample ``BAD``; anything else is ``FAILED``
and travels back with its traceback, because replacing the sample would hide a bug.
"""

from __future__ import annotations

import logging
import os
import signal
import traceback
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized

from stoker.server import failpoints
from stoker.server.imaging.decode import BadImage, DecodeLimits
from stoker.server.workers.messages import (
    Message,
    Outcome,
    Ready,
    SampleResult,
    StartFailed,
    TaskMessage,
    TaskResult,
)
from stoker.server.workers.slots import SlotViews

__all__ = ["worker_main", "run_task"]

log = logging.getLogger(__name__)
_MAX_TRACEBACK_CHARS = 8000


def run_task(task: TaskMessage, views: SlotViews, limits: DecodeLimits, progress: Synchronized) -> TaskResult:
    """Render every sample of ``task`` into its row of the slot; never raises for one sample."""
    from stoker.server.imaging.render import StageTimes, render_sample  # preloaded by the forkserver

    size = task.size
    batch = views.array(task.slot, task.rows * size * size * 3).reshape(task.rows, size, size, 3)
    times = StageTimes()
    results: list[SampleResult] = []
    for position, (row, path, key) in enumerate(task.samples):
        progress.value = position
        try:
            failpoints.check("worker.sample")
            render_sample(path, key, task.pipeline, size, batch[row], limits, times)
            results.append(SampleResult(row, Outcome.OK))
        except BadImage as exc:
            results.append(SampleResult(row, Outcome.BAD, exc.reason))
        except MemoryError:
            results.append(SampleResult(row, Outcome.BAD, "out of memory while decoding"))
        except Exception as exc:  # not the file's fault: the engine fails the batch, with the evidence
            trace = traceback.format_exc()[-_MAX_TRACEBACK_CHARS:]
            results.append(SampleResult(row, Outcome.FAILED, f"{type(exc).__name__}: {exc}", trace))
    progress.value = -1
    del batch
    return TaskResult(task.task_id, tuple(results), times.as_tuple())


def _initialise(conn: Connection) -> SlotViews:
    # The engine handles SIGINT/SIGTERM for the whole tree; a worker stops when told to.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    import torch  # heavy: imported here so the server process itself never loads it

    # One intra-op thread: parallelism comes from the pool, and oversubscribing cores hurts.
    torch.set_num_threads(1)
    from stoker.server.imaging.render import warm_up

    warm_up()
    failpoints.armed()  # an unknown fail point name fails the start, not the first sample
    return SlotViews()


def worker_main(conn: Connection, progress: Synchronized, limits: DecodeLimits) -> None:
    """Entry point of a worker process; returns when told to stop or when the server is gone."""
    try:
        views = _initialise(conn)
        conn.send(Ready(os.getpid()))
    except BaseException as exc:  # report any start-up failure, then exit
        conn.send(StartFailed(f"{type(exc).__name__}: {exc}", traceback.format_exc()[-_MAX_TRACEBACK_CHARS:]))
        return
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            kind = getattr(message, "kind", None)
            if kind is Message.TASK:
                conn.send(run_task(message, views, limits, progress))
            elif kind is Message.FORGET:
                views.forget(message.name)
            elif kind is Message.STOP:
                return
            else:
                log.error("worker %d: ignoring an unknown message %r", os.getpid(), type(message).__name__)
    except (BrokenPipeError, EOFError):
        return
    finally:
        views.close()
