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
from stoker.server.cache import CacheEntry, SampleHeader, WorkerCache
from stoker.server.data.locators import StoreUnavailable
from stoker.server.imaging.decode import BadImage, ImageInfo, decode, probe
from stoker.server.imaging.errors import PostOpError
from stoker.server.imaging.reading import Reader
from stoker.server.workers.messages import (
    Message,
    Outcome,
    Ready,
    SampleResult,
    SampleSpec,
    StartFailed,
    TaskMessage,
    TaskResult,
    WorkerSetup,
)
from stoker.server.workers.slots import SlotViews

if TYPE_CHECKING:
    from stoker.server.imaging.render import PostOpsRunner
    from stoker.server.imaging.targets import SampleTargets

__all__ = ["worker_main", "run_task", "render_spec", "WorkerTools"]

log = logging.getLogger(__name__)
_MAX_TRACEBACK_CHARS = 8000


def _rows(task: TaskMessage, views: SlotViews) -> list[list[np.ndarray]]:
    """For each row of the batch, its output array per view (views are consecutive blocks), and its
    mask's last when the job carries one (its block follows the views')."""
    sides = task.pipeline.sizes(task.size)
    shapes: list[tuple[int, ...]] = [
        (task.rows, 3, s, s) if task.layout == "nchw" else (task.rows, s, s, 3) for s in sides
    ]
    if task.mask_side:
        shapes.append((task.rows, task.mask_side, task.mask_side))
    total = sum(batch_nbytes(shape) for shape in shapes)
    flat = views.array(task.slot, total)
    blocks = [
        flat[offset : offset + size].reshape(shape)
        for (offset, size), shape in zip(view_blocks(shapes), shapes, strict=True)
    ]
    return [[block[row] for block in blocks] for row in range(task.rows)]


@dataclass(eq=False)
class WorkerTools:
    """What a worker keeps between tasks: its slot mappings, its reader, its side of the decoded-sample
    cache and the post-ops built so far."""

    slots: SlotViews
    reader: Reader
    cache: WorkerCache
    post: PostOpsRunner | None = None

    def close(self) -> None:
        """Unmap and stop the read threads."""
        self.slots.close()
        self.reader.close()
        self.cache.close()


@dataclass(frozen=True, slots=True)
class _Rendered:
    """What became of one sample that rendered: decoded or read from the cache, what it stored, and
    its small targets."""

    decoded: bool
    stored: CacheEntry | None = None
    header: SampleHeader | None = None
    targets: dict | None = None


def _targets(task: TaskMessage, spec: SampleSpec, tools: WorkerTools, info: ImageInfo) -> SampleTargets | None:
    """The sample's requested targets, parsed and checked (a mask read now: targets are never cached,
    so the decoded cache cannot serve a stale one)."""
    if not spec.targets:
        return None
    from stoker.server.imaging.targets import BadTarget, parse_targets

    mask_bytes = None
    for target in spec.targets:
        if target.kind == "mask" and target.locator is not None:
            try:
                mask_bytes = tools.reader.read(target.locator)
            except BadImage as exc:
                raise BadTarget(target.name, f"mask {exc.reason}") from None
    return parse_targets(spec.targets, info, mask_bytes, task.min_box_visibility)


def _finish_targets(targets: SampleTargets | None, mask_row: np.ndarray | None) -> dict | None:
    if targets is None:
        return None
    if mask_row is not None and targets.mask is not None:
        mask_row[...] = targets.mask
    return targets.wire_values()


def render_spec(
    task: TaskMessage, spec: SampleSpec, tools: WorkerTools, data: object, out: list, times: Any
) -> _Rendered:
    """One sample into its rows, from the arena when it holds the sample at the reduction this sample's
    views need, else from its bytes (``data``: read ahead, the error reading them, or ``None``: read
    now); stores what it decoded when the task holds the sample's claim."""
    from stoker.server.imaging.render import decode_reduction, plan_views, render_pixels  # preloaded

    failpoints.check("worker.sample")
    part, limits = spec.cache, tools.reader.limits
    probing = 0.0  # the header's read is part of the decode's time
    if _reads_ahead(spec):
        data = _bytes(spec, tools, data, times)
        started = time.perf_counter()
        info = probe(data, limits)
        probing = time.perf_counter() - started
    else:
        header = part.header  # type: ignore[union-attr]
        info = ImageInfo(header.width, header.height, header.orientation, header.jpeg)
    plans = plan_views(info, spec.key, task.pipeline, task.size)
    reduction = decode_reduction(info, plans, task.decode_min_side)
    targets = _targets(task, spec, tools, info)
    mask_row = out[-1] if task.mask_side else None
    views = out[:-1] if task.mask_side else out
    pixels = tools.cache.read(part, reduction)
    if pixels is not None:
        render_pixels(pixels, info, spec.key, task.pipeline, task.size, views, times, tools.post, plans, targets)
        return _Rendered(decoded=False, targets=_finish_targets(targets, mask_row))
    data = _bytes(spec, tools, data, times)
    started = time.perf_counter()
    pixels = decode(data, info, reduction, limits)
    times.add("decode", probing + time.perf_counter() - started)
    render_pixels(pixels, info, spec.key, task.pipeline, task.size, views, times, tools.post, plans, targets)
    stored = tools.cache.store(part, pixels, reduction)
    header = SampleHeader(info.width, info.height, info.orientation, info.jpeg) if stored is not None else None
    return _Rendered(decoded=True, stored=stored, header=header, targets=_finish_targets(targets, mask_row))


def _reads_ahead(spec: SampleSpec) -> bool:
    """Whether the sample's bytes are read before it renders: always, unless the arena has its header
    (then only if its entry turns out to be at another reduction than its views need)."""
    return spec.cache is None or spec.cache.header is None


def _bytes(spec: SampleSpec, tools: WorkerTools, data: object, times: Any) -> bytes:
    """The sample's bytes: read ahead, or read now (a cached sample whose entry is at another reduction)."""
    if isinstance(data, Exception):
        raise data
    if data is None:
        started = time.perf_counter()
        data = tools.reader.read(spec.locator)
        times.add("read", time.perf_counter() - started)
    return data  # type: ignore[return-value]


def run_task(task: TaskMessage, tools: WorkerTools, progress: Synchronized) -> TaskResult:
    """Render every sample of ``task`` into its rows of the slot; never raises for one sample."""
    from stoker.server.imaging.render import StageTimes  # preloaded by the forkserver

    rows = _rows(task, tools.slots)
    times = StageTimes()
    results: list[SampleResult] = []
    contents = tools.reader.read_all([spec.locator for spec in task.samples if _reads_ahead(spec)])
    for position, spec in enumerate(task.samples):
        progress.value = position
        data: object = None
        if _reads_ahead(spec):
            waited = time.perf_counter()
            data = next(contents)
            times.add("read", time.perf_counter() - waited)
        row = spec.row
        try:
            done = render_spec(task, spec, tools, data, rows[row], times)
            results.append(
                SampleResult(
                    row,
                    Outcome.OK,
                    decoded=done.decoded,
                    stored=done.stored,
                    header=done.header,
                    targets=done.targets,
                )
            )
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


def _initialise(setup: WorkerSetup) -> SlotViews:
    # The engine handles SIGINT/SIGTERM for the whole tree; a worker stops when told to.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    import torch  # heavy: imported here so the server process itself never loads it

    # One intra-op thread: parallelism comes from the pool, and oversubscribing cores hurts.
    torch.set_num_threads(1)
    from stoker.server.data.stores import configure_stores
    from stoker.server.imaging.kernels import single_thread

    single_thread()  # OpenCV's fast kernels likewise
    from stoker.server.imaging.render import warm_up

    configure_stores(setup.store)
    warm_up(setup.limits)
    failpoints.check("worker.start")  # an unknown fail point name fails the start, not the first sample
    return SlotViews()


def worker_main(
    conn: Connection,
    progress: Synchronized,
    setup: WorkerSetup,
) -> None:
    """Entry point of a worker process; returns when told to stop or when the server is gone."""
    try:
        tools = WorkerTools(_initialise(setup), Reader(setup.limits, setup.reads_in_flight), WorkerCache(setup.arena))
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
