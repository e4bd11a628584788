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
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from typing import TYPE_CHECKING, Any

import numpy as np

from stoker.client.protocol.wire import batch_nbytes, view_blocks
from stoker.server import failpoints
from stoker.server.data.locators import StoreUnavailable
from stoker.server.imaging.decode import BadImage, ImageInfo
from stoker.server.imaging.errors import PostOpError
from stoker.server.imaging.limits import DecodeLimits
from stoker.server.imaging.reading import Reader
from stoker.server.workers.arena import ArenaHandle, ArenaView, attach
from stoker.server.workers.messages import (
    CacheEntry,
    Message,
    Outcome,
    Ready,
    SampleResult,
    SampleSpec,
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


@dataclass(eq=False)
class WorkerTools:
    """What a worker keeps between tasks: its slot mappings, its reader, the decoded-sample arena
    (when the server has one) and the post-ops built so far."""

    slots: SlotViews
    reader: Reader
    arena: ArenaView | None = None
    post: PostOpsRunner | None = None

    def close(self) -> None:
        """Unmap and stop the read threads."""
        self.slots.close()
        self.reader.close()
        if self.arena is not None:
            self.arena.close()


def _store(tools: WorkerTools, pixels: np.ndarray, info: ImageInfo) -> CacheEntry | None:
    """Write a decoded sample into the arena; ``None`` once the budget is spent."""
    arena = tools.arena
    offset = arena.reserve(pixels.nbytes) if arena is not None else None
    if arena is None or offset is None:
        return None
    arena.write(offset, pixels)
    height, width = pixels.shape[:2]
    return CacheEntry(offset, height, width, info.width, info.height, info.orientation, info.jpeg)


def _render(task: TaskMessage, spec: SampleSpec, tools: WorkerTools, data: object, out: list, times: Any) -> object:
    """One sample into its rows: from the arena, or from ``data`` (its bytes, or the error reading
    them); returns the cache entry it wrote, if any."""
    from stoker.server.imaging.render import render_bytes, render_pixels  # preloaded by the forkserver

    failpoints.check("worker.sample")
    if spec.cached is not None and tools.arena is not None:
        entry = spec.cached
        pixels = tools.arena.read(entry.offset, (entry.height, entry.width, 3))
        info = ImageInfo(entry.stored_width, entry.stored_height, entry.orientation, entry.jpeg)
        render_pixels(pixels, info, spec.key, task.pipeline, task.size, out, times, tools.post)
        return None
    if isinstance(data, Exception):
        raise data
    pixels, info = render_bytes(
        data,  # type: ignore[arg-type]
        spec.key,
        task.pipeline,
        task.size,
        out,
        tools.reader.limits,
        times,
        tools.post,
        task.decode_min_side,
    )
    return _store(tools, pixels, info) if spec.store else None


def run_task(task: TaskMessage, tools: WorkerTools, progress: Synchronized) -> TaskResult:
    """Render every sample of ``task`` into its rows of the slot; never raises for one sample."""
    from stoker.server.imaging.render import StageTimes  # preloaded by the forkserver

    rows = _rows(task, tools.slots)
    times = StageTimes()
    results: list[SampleResult] = []
    contents = tools.reader.read_all([spec.locator for spec in task.samples if spec.cached is None])
    for position, spec in enumerate(task.samples):
        progress.value = position
        data: object = None
        if spec.cached is None:
            waited = time.perf_counter()
            data = next(contents)
            times.add("read", time.perf_counter() - waited)
        row = spec.row
        try:
            stored = _render(task, spec, tools, data, rows[row], times)
            results.append(SampleResult(row, Outcome.OK, stored=stored))  # type: ignore[arg-type]
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


def worker_main(
    conn: Connection,
    progress: Synchronized,
    limits: DecodeLimits,
    reads_in_flight: int = 1,
    arena: ArenaHandle | None = None,
) -> None:
    """Entry point of a worker process; returns when told to stop or when the server is gone."""
    try:
        tools = WorkerTools(_initialise(conn), Reader(limits, reads_in_flight), attach(arena))
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
                if tools.post is None and message.pipeline.has_post_ops:
                    from stoker.server.imaging.render import PostOpsRunner  # preloaded by the forkserver

                    tools.post = PostOpsRunner()  # torchvision's transforms load on the first post-op
                conn.send(run_task(message, tools, progress))
            elif kind is Message.FORGET:
                tools.slots.forget(message.name)
            elif kind is Message.STOP:
                return
            else:
                log.error("worker %d: ignoring an unknown message %r", os.getpid(), type(message).__name__)
    except (BrokenPipeError, EOFError):
        return
    finally:
        tools.close()
