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
import time
import traceback
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from typing import TYPE_CHECKING

import numpy as np

from stoker.client.protocol.wire import batch_nbytes, view_blocks
from stoker.server import failpoints
from stoker.server.data.locators import StoreUnavailable
from stoker.server.imaging.decode import BadImage
from stoker.server.imaging.errors import PostOpError
from stoker.server.imaging.limits import DecodeLimits
from stoker.server.imaging.reading import Reader
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

if TYPE_CHECKING:
    from stoker.server.imaging.render import PostOpsRunner

__all__ = ["worker_main", "run_task"]

log = logging.getLogger(__name__)
_MAX_TRACEBACK_CHARS = 8000


def _rows(task: TaskMessage, views: SlotViews) -> list[list[np.ndarray]]:
    """For each row of the batch, its output array per view (views are consecutive blocks)."""
    shapes = [(task.rows, side, side, 3) for side in task.pipeline.sizes(task.size)]
    total = sum(batch_nbytes(shape) for shape in shapes)
    flat = views.array(task.slot, total)
    blocks = [
        flat[offset : offset + size].reshape(shape)
        for (offset, size), shape in zip(view_blocks(shapes), shapes, strict=True)
    ]
    return [[block[row] for block in blocks] for row in range(task.rows)]


def run_task(
    task: TaskMessage, views: SlotViews, reader: Reader, progress: Synchronized, post: PostOpsRunner | None
) -> TaskResult:
    """Render every sample of ``task`` into its rows of the slot; never raises for one sample."""
    from stoker.server.imaging.render import StageTimes, render_bytes  # preloaded by the forkserver

    rows = _rows(task, views)
    times = StageTimes()
    results: list[SampleResult] = []
    contents = reader.read_all([locator for _, locator, _ in task.samples])
    for position, (row, _, key) in enumerate(task.samples):
        progress.value = position
        waited = time.perf_counter()
        data = next(contents)
        times.add("read", time.perf_counter() - waited)
        try:
            failpoints.check("worker.sample")
            if isinstance(data, Exception):
                raise data
            render_bytes(data, key, task.pipeline, task.size, rows[row], reader.limits, times, post)
            results.append(SampleResult(row, Outcome.OK))
        except StoreUnavailable as exc:
            results.append(SampleResult(row, Outcome.UNAVAILABLE, str(exc)))
        except BadImage as exc:
            results.append(SampleResult(row, Outcome.BAD, exc.reason))
        except MemoryError:
            results.append(SampleResult(row, Outcome.BAD, "out of memory while decoding"))
        except PostOpError as exc:
            results.append(SampleResult(row, Outcome.PIPELINE, exc.reason, exc.trace, exc.op))
        except Exception as exc:  # not the file's fault: the engine fails the batch, with the evidence
            trace = traceback.format_exc()[-_MAX_TRACEBACK_CHARS:]
            results.append(SampleResult(row, Outcome.FAILED, f"{type(exc).__name__}: {exc}", trace))
    progress.value = -1
    del rows
    return TaskResult(task.task_id, tuple(results), times.totals())


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


def worker_main(conn: Connection, progress: Synchronized, limits: DecodeLimits, reads_in_flight: int = 1) -> None:
    """Entry point of a worker process; returns when told to stop or when the server is gone."""
    reader = Reader(limits, reads_in_flight)
    try:
        views = _initialise(conn)
        conn.send(Ready(os.getpid()))
    except BaseException as exc:  # report any start-up failure, then exit
        conn.send(StartFailed(f"{type(exc).__name__}: {exc}", traceback.format_exc()[-_MAX_TRACEBACK_CHARS:]))
        return
    post: PostOpsRunner | None = None
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            kind = getattr(message, "kind", None)
            if kind is Message.TASK:
                if post is None and message.pipeline.has_post_ops:
                    from stoker.server.imaging.render import PostOpsRunner  # preloaded by the forkserver

                    post = PostOpsRunner()  # torchvision's transforms load on the first post-op
                conn.send(run_task(message, views, reader, progress, post))
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
        reader.close()
