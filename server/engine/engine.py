"""The engine: one thread that ties the data socket, the planner and the worker pool together.

A request ``(job, epoch, rank, k)`` becomes a :class:`BatchWork`; its rows are cut into tasks for the
workers, who write into one shared-memory slot; when every row is done the slot is sent, zero-copy, to
every client waiting for that batch and kept in a small cache. The engine keeps no client progress:
a restarted server answers the next request as if nothing happened.

Only the engine thread touches the socket, the pool and the state below. Other threads (the HTTP
side) talk to it through :meth:`Engine.call`, which runs a function on the engine thread.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import queue
import shutil
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import replace
from typing import Any, TypeVar

import zmq

from stoker.client.protocol.errors import ProtocolError
from stoker.client.protocol.job import JobSpec
from stoker.client.protocol.wire import ErrorCode, Header, Kind, decode, encode
from stoker.server.data.catalog import Catalog
from stoker.server.data.jobs import JobRegistry, OpenJob
from stoker.server.engine.config import EngineConfig
from stoker.server.engine.records import BatchKey, BatchPlanner, BatchWork, CachedBatch, Peer, PendingSend, Task
from stoker.server.engine.state import build_snapshot
from stoker.server.engine.stats import BadSamples, EngineStats, PeerStats
from stoker.server.engine.transport import Incoming, Transport
from stoker.server.imaging.pipelines import Pipeline
from stoker.server.version import VERSION
from stoker.server.workers.pool import TaskDone, WorkerDied, WorkerFailed, WorkerPool
from stoker.server.workers.process import TaskMessage
from stoker.server.workers.slots import SlotPool

__all__ = ["Engine", "VERSION"]

log = logging.getLogger(__name__)
R = TypeVar("R")
_MAX_EPOCH = 2**31 - 1
_KILLS_BEFORE_QUARANTINE = 2


class Engine:
    """The data plane. ``start()`` brings it up, ``close()`` drains it and tears it down."""

    def __init__(self, config: EngineConfig, catalog: Catalog, pipelines: Mapping[str, Pipeline]) -> None:
        self.config = config
        self.catalog = catalog
        self.pipelines = dict(pipelines)
        config = replace(config, max_shm_bytes=_fit_shm(config.max_shm_bytes))
        self.config = config
        # A job's batch must fit twice in the budget: one being filled while another is sent.
        self.jobs = JobRegistry(
            catalog, self.pipelines, config.max_batch_size, config.max_image_size, config.max_shm_bytes // 2
        )
        self.stats = EngineStats()
        self.bad = BadSamples()
        self.planner = BatchPlanner(self.jobs, self.bad, self.stats)
        self.pool: WorkerPool[Task] = WorkerPool(config.workers, config.limits, config.worker_start_timeout_s)
        self.slots = SlotPool(config.max_shm_bytes)
        self.endpoint = ""
        self.started = threading.Event()
        self.stopped = threading.Event()
        self._context: zmq.Context | None = None
        self._transport: Transport | None = None
        self._thread: threading.Thread | None = None
        self._commands: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Future[Any]]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._stopping = False
        self._drain_deadline = 0.0
        self._task_ids = itertools.count()
        self._works: dict[BatchKey, BatchWork] = {}
        self._queue: deque[BatchWork] = deque()
        self._ready: deque[Task] = deque()
        self._sends: list[PendingSend] = []
        self._cache: OrderedDict[BatchKey, CachedBatch] = OrderedDict()
        self._peers: dict[bytes, Peer] = {}
        self._kills: dict[tuple[str, int], int] = {}
        self._last_housekeeping = 0.0

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the workers (waiting until they are ready), bind the socket, start the loop."""
        self.pool.start()
        self._context = zmq.Context()
        self._transport = Transport(self._context, self.config.bind, self.config.heartbeat_ms)
        self.endpoint = self._transport.endpoint
        self._thread = threading.Thread(target=self._run, name="stoker-engine", daemon=True)
        self._thread.start()
        self.started.set()

    @property
    def ready(self) -> bool:
        """Serving: workers up, socket bound, loop running, not draining."""
        return self.started.is_set() and not self._stopping and not self.stopped.is_set()

    def close(self, timeout_s: float | None = None) -> None:
        """Stop accepting requests, let in-flight batches finish (bounded), stop workers, unbind."""
        if self._thread is None:
            self.pool.close()
            self.slots.close()
            return
        drain = self.config.drain_timeout_s if timeout_s is None else timeout_s
        self._submit(self._begin_drain, (drain,))
        self._thread.join(drain + 30.0)
        if self._thread.is_alive():
            log.error("engine thread did not stop within %.1f s", drain + 30.0)
        self._thread = None
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, fn: Callable[..., R], *args: Any) -> Future[R]:
        """Run ``fn(*args)`` on the engine thread; the future holds its result."""
        return self._submit(fn, args)

    def _submit(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Future[Any]:
        future: Future[Any] = Future()
        if self.stopped.is_set():
            future.set_exception(RuntimeError("engine is stopped"))
            return future
        self._commands.put((fn, args, future))
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        return future

    # -- the loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        transport = self._transport
        if transport is None:
            raise RuntimeError("start() first")
        poller = zmq.Poller()
        poller.register(transport.socket, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        registered: set[int] = set()
        try:
            while True:
                fds = set(self.pool.fds())
                for fd in registered - fds:
                    poller.unregister(fd)
                for fd in fds - registered:
                    poller.register(fd, zmq.POLLIN)
                registered = fds
                timeout_ms = 5 if self._sends else 50
                events = dict(poller.poll(timeout_ms))
                if self._wake_r in events:
                    self._run_commands()
                for fd in fds & events.keys():
                    for event in self.pool.handle(fd):
                        self._on_pool_event(event)
                self._reap_sends()
                if transport.socket in events:
                    for incoming in transport.receive():
                        self._on_message(incoming)
                self._dispatch()
                self._housekeeping()
                if self._stopping and self._drained():
                    break
        except Exception:
            log.exception("engine loop crashed")
        finally:
            self._shutdown()

    def _run_commands(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                fn, args, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except Exception as exc:  # the caller gets the error, the loop goes on
                future.set_exception(exc)

    # -- messages --------------------------------------------------------------------------------

    def _peer(self, identity: bytes) -> Peer:
        peer = self._peers.get(identity)
        if peer is None:
            peer = self._peers[identity] = Peer(PeerStats(identity))
        peer.stats.last_seen = time.monotonic()
        return peer

    def _error(self, identity: bytes, code: ErrorCode, message: str, **extra: Any) -> None:
        self.stats.error(code.name)
        if self._transport is not None:
            self._transport.send(identity, Kind.ERROR, {"code": int(code), "message": message, **extra})

    def _on_message(self, incoming: Incoming) -> None:
        identity = incoming.identity
        peer = self._peer(identity)
        header: Header | None = None
        try:
            if len(incoming.frames) != 1:
                raise ProtocolError(f"a client message is one header frame, got {len(incoming.frames)} frames")
            header = decode(incoming.frames[0])
            if header.kind == Kind.BYE:
                self._forget_peer(identity)
            elif self._stopping and header.kind in (Kind.HELLO, Kind.REQUEST):
                self._error(identity, ErrorCode.SHUTTING_DOWN, "server is shutting down", **_where(header))
            elif header.kind == Kind.HELLO:
                self._on_hello(identity, peer, header)
            elif header.kind == Kind.REQUEST:
                self._on_request(identity, peer, header)
            else:
                raise ProtocolError(f"clients do not send {header.kind.name} messages")
        except ProtocolError as exc:
            self._error(identity, ErrorCode(exc.code), str(exc), **(_where(header) if header else {}))
        except Exception as exc:  # a bug handling one message must not take the server down
            log.exception("failed to handle a message")
            self._error(identity, ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    def _open(self, raw_job: dict[str, Any]) -> OpenJob:
        return self.jobs.open(JobSpec.from_wire(raw_job))

    def _on_hello(self, identity: bytes, peer: Peer, header: Header) -> None:
        fields = header.fields
        job = self._open(fields["job"])
        stats = peer.stats
        stats.client_id, stats.job_id = fields["client"][:64], job.job_id
        stats.rank, stats.world_size = fields.get("rank", 0), job.spec.world_size
        granted = max(1, min(fields.get("prefetch", self.config.max_prefetch), self.config.max_prefetch))
        table = job.table
        size = job.spec.image_size
        self._transport.send(  # type: ignore[union-attr]
            identity,
            Kind.JOB_INFO,
            {
                "job_id": job.job_id,
                "samples": len(table),
                "classes": list(table.classes) if len(table.classes) <= 10000 else [],
                "batches": job.batches,
                "image_shape": [size, size, 3],
                "fingerprint": table.fingerprint,
                "prefetch": granted,
                "server": VERSION,
            },
        )

    def _on_request(self, identity: bytes, peer: Peer, header: Header) -> None:
        fields = header.fields
        job = self._open(fields["job"])
        epoch, rank, k = fields["epoch"], fields["rank"], fields["k"]
        if not 0 <= epoch <= _MAX_EPOCH:
            raise ProtocolError(f"epoch={epoch} must be in [0, {_MAX_EPOCH}]", ErrorCode.OUT_OF_RANGE)
        if not 0 <= rank < job.spec.world_size:
            raise ProtocolError(f"rank={rank} must be in [0, {job.spec.world_size})", ErrorCode.OUT_OF_RANGE)
        if not 0 <= k < job.batches:
            raise ProtocolError(
                f"k={k} is past the end of the epoch: this job has {job.batches} batches per rank",
                ErrorCode.OUT_OF_RANGE,
            )
        fingerprint = fields.get("fingerprint")
        if fingerprint is not None and fingerprint != job.table.fingerprint:
            raise ProtocolError(
                f"dataset {job.spec.dataset!r} on this server differs from the one the job was opened on",
                ErrorCode.DATASET_CHANGED,
            )
        stats = peer.stats
        stats.client_id = fields["client"][:64]
        stats.job_id, stats.epoch, stats.rank, stats.world_size = job.job_id, epoch, rank, job.spec.world_size
        stats.waited_s = float(fields.get("waited_s", stats.waited_s))
        stats.elapsed_s = float(fields.get("elapsed_s", stats.elapsed_s))
        key = (job.job_id, epoch, rank, k)
        if key in peer.inflight or key in peer.deferred:
            return  # a retry of something already on its way
        if len(peer.inflight) >= self.config.max_prefetch:
            self._reap_sends()
        if len(peer.inflight) >= self.config.max_prefetch:
            if len(peer.deferred) >= self.config.max_prefetch:
                raise ProtocolError(
                    f"more than max_prefetch={self.config.max_prefetch} batches in flight; wait for some",
                    ErrorCode.BUSY,
                )
            peer.deferred.append(key)
            return
        self._admit(identity, peer, job, key)

    def _admit(self, identity: bytes, peer: Peer, job: OpenJob, key: BatchKey) -> None:
        peer.inflight.add(key)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            self._send(identity, key, cached, now)
            return
        work = self._works.get(key)
        if work is None:
            work = self.planner.plan(job, key, self.config.on_error, self.config.max_replacements)
            self._works[key] = work
            if work.failure is None:
                self._queue.append(work)
        work.waiters.setdefault(identity, now)
        self._maybe_complete(work)

    def _forget_peer(self, identity: bytes) -> None:
        peer = self._peers.pop(identity, None)
        if peer is None:
            return
        for key in peer.inflight:
            work = self._works.get(key)
            if work is None:
                continue
            work.waiters.pop(identity, None)
            if not work.waiters and work.slot is None and work in self._queue:
                # Nobody wants it and no worker touched it: drop it rather than decode for no one.
                self._queue.remove(work)
                del self._works[key]
        log.info("client %s (%s) gone", peer.stats.client_id or "?", identity.hex())

    # -- dispatch --------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        capacity = len(self.pool.workers) * self.config.worker_queue_depth
        while self._queue and len(self._ready) < capacity:
            work = self._queue[0]
            slot = self.slots.acquire(work.nbytes)
            if slot is None:
                break  # the shared-memory budget is spent; wait for sends to finish
            self._queue.popleft()
            work.slot = slot
            work.dispatched_at = time.monotonic()
            rows = sorted(work.pending)
            chunk = max(1, min(16, math.ceil(len(rows) / max(1, 2 * len(self.pool.workers)))))
            for start in range(0, len(rows), chunk):
                samples = [(row, int(work.indices[row])) for row in rows[start : start + chunk]]
                self._ready.append(Task(next(self._task_ids), work, samples))
                work.tasks_out += 1
        depth = self.config.worker_queue_depth
        while self._ready:
            available = self.pool.available(depth)
            if not available:
                return
            for worker in available:
                task = self._next_task()
                if task is None:
                    return
                self.pool.submit(worker, task, self._message(task))

    def _next_task(self) -> Task | None:
        while self._ready:
            task = self._ready.popleft()
            if task.work.failure is None:
                return task
            task.work.tasks_out -= 1
            self._maybe_complete(task.work)
        return None

    def _message(self, task: Task) -> TaskMessage:
        work = task.work
        job, epoch = work.job, work.key[1]
        table = job.table
        samples = tuple(
            (row, table.path(index), self.jobs.sample_key(job, epoch, index)) for row, index in task.samples
        )
        if work.slot is None:
            raise RuntimeError("a task of an undispatched batch")  # unreachable: tasks come from dispatch
        return TaskMessage(
            task.task_id, work.slot.name, len(work.originals), job.spec.image_size, job.pipeline, samples
        )

    # -- results ---------------------------------------------------------------------------------

    def _on_pool_event(self, event: TaskDone[Task] | WorkerDied[Task] | WorkerFailed[Task]) -> None:
        if isinstance(event, TaskDone):
            self._on_task_done(event)
        elif isinstance(event, WorkerDied):
            self._on_worker_died(event)
        else:
            log.error("worker %d failed to start: %s", event.worker.worker_id, event.reason)

    def _on_task_done(self, event: TaskDone[Task]) -> None:
        task, work = event.task, event.task.work
        work.tasks_out -= 1
        count = len(task.samples)
        for stage, total in zip(("read", "decode", "augment"), event.times, strict=False):
            self.stats.stage(stage, total / count, count)
        for row, reason in event.outcomes:
            self.stats.samples_total.labels("ok" if reason is None else "bad").inc()
            if work.failure is not None:
                break
            if reason is None:
                work.pending.discard(row)
            elif self._stand_in(work, row, reason):
                self._ready.appendleft(Task(next(self._task_ids), work, [(row, int(work.indices[row]))]))
                work.tasks_out += 1
        self._maybe_complete(work)

    def _stand_in(self, work: BatchWork, row: int, reason: str) -> bool:
        """Record ``row``'s sample as bad and point the row at its stand-in (``False``: batch failed)."""
        bad = self.planner.record_bad(work, row, reason)
        return self.planner.replace(work, row, bad, self.config.on_error, self.config.max_replacements)

    def _on_worker_died(self, event: WorkerDied[Task]) -> None:
        if not event.worker.retiring:
            self.stats.restarts_total.inc()
        tasks = event.tasks
        if tasks and 0 <= event.position < len(tasks[0].samples):
            first = tasks[0]
            row, index = first.samples[event.position]
            key = (first.work.job.table.name, index)
            self._kills[key] = kills = self._kills.get(key, 0) + 1
            if kills >= _KILLS_BEFORE_QUARANTINE:
                reason = f"quarantined: killed {kills} workers (last exit code {event.exitcode})"
                first.samples.remove((row, index))
                work = first.work
                if self._stand_in(work, row, reason):
                    first.samples.append((row, int(work.indices[row])))
        # Redo everything the dead worker held, ahead of new work: slots are already reserved.
        for task in reversed(tasks):
            if task.samples:
                self._ready.appendleft(task)
            else:
                task.work.tasks_out -= 1
                self._maybe_complete(task.work)

    def _maybe_complete(self, work: BatchWork) -> None:
        if work.tasks_out or (work.pending and work.failure is None):
            return
        if self._works.get(work.key) is work:
            del self._works[work.key]
        now = time.monotonic()
        if work.failure is not None:
            for identity in work.waiters:
                peer = self._peers.get(identity)
                if peer is not None:
                    peer.inflight.discard(work.key)
                self._error(
                    identity,
                    ErrorCode(work.failure["code"]),
                    work.failure["message"],
                    **_batch_where(work.key),
                    **{k: v for k, v in work.failure.items() if k in ("path", "reason")},
                )
            if work.slot is not None:
                self.slots.release(work.slot)
            return
        if work.slot is None:
            return  # planned but never dispatched: still queued
        self.stats.stage("batch", now - work.dispatched_at)
        job = work.job
        size = job.spec.image_size
        rows = len(work.indices)
        header = encode(
            Kind.BATCH,
            {
                "job_id": job.job_id,
                **_batch_where(work.key),
                "dtype": "uint8",
                "shape": [rows, size, size, 3],
                "labels": job.table.labels[work.indices].tolist(),
                "indices": work.indices.tolist(),
            },
        )
        cached = CachedBatch(work.slot, header, work.nbytes, rows)
        for identity, asked_at in work.waiters.items():
            self._send(identity, work.key, cached, asked_at)
        if self.config.cache_batches:
            self._cache[work.key] = cached
            self.slots.retain(work.slot)
            while len(self._cache) > self.config.cache_batches:
                _, evicted = self._cache.popitem(last=False)
                self.slots.release(evicted.slot)
        self.slots.release(work.slot)

    def _send(self, identity: bytes, key: BatchKey, batch: CachedBatch, asked_at: float) -> None:
        transport = self._transport
        peer = self._peers.get(identity)
        tracker = None
        if transport is not None and peer is not None:
            payload = batch.slot.view(batch.nbytes)
            tracker = transport.send_batch(identity, batch.header, payload, batch.nbytes // batch.images)
        if tracker is None:
            if peer is not None:
                peer.inflight.discard(key)
            return
        self.slots.retain(batch.slot)
        self._sends.append(
            PendingSend(tracker, batch.slot, identity, key, batch.nbytes, batch.images, asked_at, time.monotonic())
        )

    def _reap_sends(self) -> None:
        if not self._sends:
            return
        now = time.monotonic()
        still: list[PendingSend] = []
        for send in self._sends:
            if not send.tracker.done:
                still.append(send)
                continue
            self.slots.release(send.slot)
            self.stats.stage("send", now - send.started_at)
            self.stats.delivered(send.images, send.nbytes, now - send.requested_at)
            peer = self._peers.get(send.identity)
            if peer is None:
                continue
            peer.inflight.discard(send.key)
            stats = peer.stats
            stats.batches += 1
            stats.images += send.images
            stats.bytes += send.nbytes
            stats.throughput.add(now, send.images, send.nbytes)
            while peer.deferred and len(peer.inflight) < self.config.max_prefetch:
                key = peer.deferred.popleft()
                job = self.jobs.get(key[0])
                if job is not None:
                    self._admit(send.identity, peer, job, key)
        self._sends = still

    # -- housekeeping and shutdown ---------------------------------------------------------------

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_housekeeping < min(0.5, self.config.task_timeout_s / 4):
            return
        self._last_housekeeping = now
        self.pool.kill_stuck(self.config.task_timeout_s)
        for identity, peer in list(self._peers.items()):
            # A silent client's queued batches are dropped and its slots freed once sends finish.
            if now - peer.stats.last_seen > self.config.client_timeout_s:
                self._forget_peer(identity)
        for name in self.slots.destroyed:
            self.pool.broadcast(("forget", name))
        self.slots.destroyed.clear()
        stats = self.stats
        stats.workers_gauge.set(len(self.pool.workers))
        stats.busy_gauge.set(sum(1 for w in self.pool.workers if w.tasks))
        stats.clients_gauge.set(len(self._peers))
        stats.inflight_gauge.set(sum(len(p.inflight) for p in self._peers.values()))

    def _begin_drain(self, timeout_s: float) -> None:
        log.info("draining: finishing in-flight batches for up to %.1f s", timeout_s)
        self._stopping = True
        self._drain_deadline = time.monotonic() + timeout_s
        # Batches no worker has started are answered at once, so clients can go elsewhere.
        while self._queue:
            work = self._queue.popleft()
            work.fail(ErrorCode.SHUTTING_DOWN, "server is shutting down")
            self._maybe_complete(work)
        for peer in self._peers.values():
            peer.deferred.clear()

    def _drained(self) -> bool:
        if time.monotonic() >= self._drain_deadline:
            log.warning("drain timeout: %d batches and %d sends abandoned", len(self._works), len(self._sends))
            return True
        return not self._works and not self._sends

    def _shutdown(self) -> None:
        self._stopping = True
        self.pool.close()
        if self._transport is not None:
            self._transport.close()
        if self._context is not None:
            self._context.term()
        self._sends.clear()
        self._cache.clear()
        self.slots.close()
        self.stopped.set()
        while True:
            try:
                _, _, future = self._commands.get_nowait()
            except queue.Empty:
                break
            future.set_exception(RuntimeError("engine stopped"))
        log.info("engine stopped")

    # -- operator API (run on the engine thread through call()) ----------------------------------

    def reconfigure(self, **changes: Any) -> EngineConfig:
        """Apply live changes (workers, max_prefetch, on_error, cache_batches); return the new config."""
        allowed = {"workers", "max_prefetch", "on_error", "cache_batches", "client_timeout_s"}
        unknown = set(changes) - allowed
        if unknown:
            raise ValueError(f"cannot change {sorted(unknown)} live; changeable: {sorted(allowed)}")
        new = replace(self.config, **changes)
        if new.workers != self.config.workers:
            self.pool.resize(new.workers)
        self.config = new
        while len(self._cache) > new.cache_batches:
            _, evicted = self._cache.popitem(last=False)
            self.slots.release(evicted.slot)
        return new

    def snapshot(self) -> dict[str, Any]:
        """Everything ``/status`` shows, built on the engine thread (call it through :meth:`call`)."""
        return build_snapshot(self)


def _fit_shm(budget: int, mount: str = "/dev/shm") -> int:
    """The shared-memory budget, cut to what the shm mount can hold. A container's /dev/shm is often
    64 MiB; writing past it kills the writer with SIGBUS, so better a smaller budget and a warning."""
    try:
        free = shutil.disk_usage(mount).free
    except OSError:
        return budget
    usable = int(free * 0.9)
    if budget > usable:
        log.warning(
            "shared-memory budget %d MiB exceeds what %s can hold (%d MiB free); using %d MiB. "
            "Give the container more (docker --shm-size, a Memory emptyDir) or lower max_shm_mb.",
            budget // 2**20,
            mount,
            free // 2**20,
            usable // 2**20,
        )
        return max(usable, 2**20)
    return budget


def _where(header: Header) -> dict[str, int]:
    fields = header.fields
    return {name: fields[name] for name in ("epoch", "rank", "k") if isinstance(fields.get(name), int)}


def _batch_where(key: BatchKey) -> dict[str, int]:
    return {"epoch": key[1], "rank": key[2], "k": key[3]}
