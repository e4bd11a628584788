"""The worker process: decodes and augments the samples of tasks into shared batch slots.

```mermaid
stateDiagram-v2
    [*] --> starting
    starting --> failed: init raised (FAILED sent)
    starting --> idle: init done (READY sent)
    idle --> busy: TASK
    busy --> idle: DONE sent (one outcome per sample)
    idle --> idle: FORGET (unmap a destroyed slot)
    idle --> [*]: STOP, or the pipe closed (the server is gone)
    failed --> [*]
```

A worker holds no dataset: each task carries the paths and RNG keys of its samples, so a worker can
be killed and replaced at any moment and its tasks redone elsewhere with identical bytes. Before each
sample it writes the sample's row to ``progress``, shared with the engine, which is how a sample that
kills workers is identified.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized

from stoker.server.imaging.decode import BadImage, DecodeLimits
from stoker.server.imaging.pipelines import Pipeline
from stoker.server.workers.slots import SlotViews

__all__ = ["TaskMessage", "worker_main"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TaskMessage:
    """One unit of work: some rows of one batch."""

    task_id: int
    slot: str
    rows: int
    """Rows of the batch in the slot (the slot may be larger)."""
    size: int
    pipeline: Pipeline
    samples: tuple[tuple[int, bytes, int], ...]
    """``(row, path, rng_key)`` per sample."""


def _run(task: TaskMessage, views: SlotViews, limits: DecodeLimits, progress: Synchronized) -> tuple:
    from stoker.server.imaging.render import StageTimes, render_sample  # preloaded by the forkserver

    batch = views.array(task.slot, task.rows * task.size * task.size * 3).reshape(task.rows, task.size, task.size, 3)
    times = StageTimes()
    outcomes: list[tuple[int, str | None]] = []
    for position, (row, path, key) in enumerate(task.samples):
        progress.value = position
        try:
            render_sample(path, key, task.pipeline, task.size, batch[row], limits, times)
            outcomes.append((row, None))
        except BadImage as exc:
            outcomes.append((row, exc.reason))
        except MemoryError:
            outcomes.append((row, "out of memory while decoding"))
        except Exception as exc:  # any failure on one file is that file's, not the worker's
            outcomes.append((row, f"{type(exc).__name__}: {exc}"))
    progress.value = -1
    del batch
    return ("done", task.task_id, outcomes, times.as_tuple())


def worker_main(conn: Connection, progress: Synchronized, limits: DecodeLimits) -> None:
    """Entry point of a worker process; returns when told to stop or when the server is gone."""
    try:
        # The engine handles SIGINT/SIGTERM for the whole tree; a worker stops when told to.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        import torch  # heavy: imported here so the server process itself never loads it

        # One intra-op thread: parallelism comes from the pool, and oversubscribing cores hurts.
        torch.set_num_threads(1)
        from stoker.server.imaging.render import warm_up

        warm_up()
        views = SlotViews()
        conn.send(("ready", os.getpid()))
    except BaseException as exc:  # report any start-up failure, then exit
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            if message[0] == "task":
                conn.send(_run(message[1], views, limits, progress))
            elif message[0] == "forget":
                views.forget(message[1])
            elif message[0] == "stop":
                return
    except (BrokenPipeError, EOFError):
        return
    finally:
        views.close()
