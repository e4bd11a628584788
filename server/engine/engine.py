"""The engine: one thread that ties the data socket, the planner and the worker pool together.

The chain, all of it visible in this file::

    _on_message -> _on_request: read it (requests.read_request), then Admission.decide:
        ADMIT -> _produce: from Delivery's batch cache at once, or Production.want
                 (which may finish the batch then and there: planning found it cannot be made)
        DEFER -> parked in the client's window, produced once a send completes (_reap)
        BUSY  -> an ERROR with retry_after_s
    loop turn -> Production.on_event (worker results) / Production.dispatch (tasks to workers)
    every batch Production finishes -> _finish -> Delivery.complete (zero-copy send) or Delivery.fail
    Delivery.reap (sends the kernel took) -> Admission.delivered -> parked requests -> _produce

The engine keeps no client progress: a restarted server answers the next request as if nothing
happened. Only the engine thread touches the socket, the pool and the parts above. Other threads
run functions on it through :meth:`Engine.call` (the ``/status`` snapshot, live changes) and read
:attr:`Engine.vitals`, an immutable record the loop replaces at every turn (the probes). If the loop
itself raises, the engine shuts down, its vitals say why, and ``on_crash`` tells the process, which
must exit (a live process without an engine would be a zombie its orchestrator never restarts).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any, TypeVar

import zmq

from stoker.client.protocol.errors import ProtocolError
from stoker.client.protocol.wire import ErrorCode, Header, Kind, decode
from stoker.server import failpoints
from stoker.server.cache import DecodedCache, open_cache
from stoker.server.data.catalog import Catalog
from stoker.server.data.stores import configure_stores
from stoker.server.engine.access import DataAccess
from stoker.server.engine.admission import Admission, Verdict
from stoker.server.engine.delivery import Delivery
from stoker.server.engine.fleet import Fleet
from stoker.server.engine.jobs import JobRegistry, OpenJob
from stoker.server.engine.mailbox import Mailbox
from stoker.server.engine.production import Production
from stoker.server.engine.records import BatchKey, BatchWork, Peer, Task
from stoker.server.engine.requests import header_where, job_info, read_hello, read_request
from stoker.server.engine.standins import BadSamplePolicy, BatchPlanner
from stoker.server.engine.state import update_gauges
from stoker.server.engine.stats import BadSamples, EngineStats
from stoker.server.engine.transport import DataPlane, Incoming
from stoker.server.engine.vitals import Vitals
from stoker.server.imaging.pipelines import Pipeline
from stoker.server.settings.model import EngineSettings
from stoker.server.workers.messages import WorkerSetup
from stoker.server.workers.pool import CONTEXT, WorkerPool
from stoker.server.workers.restarts import RestartBackoff
from stoker.server.workers.slots import SlotPool, fit_budget

__all__ = ["Engine"]

log = logging.getLogger(__name__)
R = TypeVar("R")


class Engine:
    """The data plane. ``start()`` brings it up, ``close()`` drains it and tears it down."""

    def __init__(self, config: EngineSettings, catalog: Catalog, pipelines: Mapping[str, Pipeline]) -> None:
        self.config = config
        self.catalog = catalog
        self.pipelines = dict(pipelines)
        self.shm_budget = fit_budget(config.max_shm_bytes)
        # A job's batch must fit twice in the budget: one being filled while another is sent.
        self.jobs = JobRegistry(
            catalog, self.pipelines, config.max_batch_size, config.max_image_size, self.shm_budget // 2
        )
        self.stats = EngineStats()
        self.bad = BadSamples()
        self.cache = decoded_cache(config, catalog, self.shm_budget)
        arena = self.cache.arena.handle if self.cache.arena is not None else None
        configure_stores(config.store_config)  # this process lists datasets on object storage
        setup = WorkerSetup(config.limits, config.reads_in_flight, config.store_config, arena)
        backoff = RestartBackoff(config.worker_restart_backoff_s, config.worker_restart_backoff_max_s)
        self.pool: WorkerPool[Task] = WorkerPool(config.workers, setup, config.worker_start_timeout_s, backoff)
        self.slots = SlotPool(self.shm_budget)
        self.admission = Admission(config.max_prefetch)
        planner = BatchPlanner(self.jobs, self.bad, self.stats)
        self.fleet = Fleet(config, catalog)
        """Demand, capacity, fair shares, autoscaling and verdicts (engine/fleet.py)."""
        self.production = Production(self.pool, self.slots, self.jobs, planner, self.stats, self.cache, self.fleet.fair)
        self.delivery: Delivery | None = None
        """Exists once started (it needs the bound socket)."""
        self.endpoint = ""
        self.started = threading.Event()
        self.stopped = threading.Event()
        self.vitals = Vitals()
        """Read by other threads without the mailbox (see :mod:`.vitals`); replaced, never changed."""
        self.on_crash: Callable[[str], None] | None = None
        """Called (on the dying engine thread) with the reason, once a crashed engine has shut down."""
        self._mailbox = Mailbox()
        self._plane: DataPlane | None = None
        self.access: DataAccess | None = None
        """CURVE on the data socket, when the server has keys."""
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain_deadline = 0.0
        self._last_housekeeping = 0.0

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the workers (waiting until they are ready), bind the socket, start the loop."""
        if failpoints.armed():
            log.warning("fail points armed (for tests only): %s", sorted(failpoints.armed()))
        self.pool.start()
        config = self.config
        plane = self._plane = DataPlane(
            config.bind, config.heartbeat_ms, config.curve_secret_key_file, config.authorized_clients
        )
        self.access = plane.access
        self.delivery = Delivery(plane.transport, self.slots, self.stats)
        self.endpoint = plane.transport.endpoint
        self.vitals = Vitals("serving", time.monotonic())
        self._thread = threading.Thread(target=self._run, name="stoker-engine", daemon=True)
        self._thread.start()
        self.started.set()

    @property
    def ready(self) -> bool:
        """Serving: workers up, socket bound, loop running, not draining."""
        return self.vitals.phase == "serving"

    @property
    def inflight_batches(self) -> int:
        """Batches in production or still being sent."""
        return self.production.in_progress + (self.delivery.sending if self.delivery else 0)

    def close(self, timeout_s: float | None = None) -> None:
        """Stop accepting requests, let in-flight batches finish (bounded), stop workers, unbind."""
        if self._thread is None:
            self.pool.close()
            self.slots.close()
            self.cache.close()
            self._mailbox.close()
            return
        drain = self.config.drain_timeout_s if timeout_s is None else timeout_s
        if not self.stopped.is_set():
            self._mailbox.submit(self._begin_drain, (drain,))
        self._thread.join(drain + 30.0)
        if self._thread.is_alive():
            log.error("engine thread did not stop within %.1f s", drain + 30.0)
        self._thread = None

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, fn: Callable[..., R], *args: Any) -> Future[R]:
        """Run ``fn(*args)`` on the engine thread; the future holds its result."""
        return self._mailbox.submit(fn, args)

    # -- the loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        plane = self._plane
        if plane is None:
            raise RuntimeError("start() first")
        poller = plane.poller(self._mailbox.fd)
        registered: set[int] = set()
        crash: str | None = None
        try:
            while not (self._stopping and self._drained()):
                registered = self._turn(plane, poller, registered)
        except Exception as exc:
            log.exception("engine loop crashed")
            crash = f"the engine loop crashed: {type(exc).__name__}: {exc}"
        finally:
            self._shutdown(crash)

    def _turn(self, plane: DataPlane, poller: zmq.Poller, registered: set[int]) -> set[int]:
        """One turn of the loop: wait for something to do, do it, beat."""
        failpoints.check("engine.loop")
        registered = _follow(poller, registered, set(self.pool.fds()))
        delivery = self.delivery
        events = dict(poller.poll(5 if delivery and delivery.sending else 50))
        if self._mailbox.fd in events:
            self._mailbox.run_pending()
        for fd in registered & events.keys():
            for event in self.pool.handle(fd):
                self.fleet.measured(event)
                self._finish(self.production.on_event(event, self._policy()))
        self._reap()
        for incoming in plane.on_events(events):
            self._on_message(incoming)
        self._finish(self.production.dispatch(self.config.worker_queue_depth))
        self._housekeeping()
        self.vitals = Vitals("draining" if self._stopping else "serving", time.monotonic(), None, self.pool.problem)
        return registered

    def _policy(self) -> BadSamplePolicy:
        return BadSamplePolicy(self.config.on_error, self.config.max_replacements)

    # -- messages --------------------------------------------------------------------------------

    def _on_message(self, incoming: Incoming) -> None:
        identity = incoming.identity
        peer = self.admission.touch(identity, time.monotonic())
        header: Header | None = None
        try:
            if len(incoming.frames) != 1:
                raise ProtocolError(f"a client message is one header frame, got {len(incoming.frames)} frames")
            header = decode(incoming.frames[0])
            if header.kind == Kind.BYE:
                self._forget(identity)
            elif self._stopping and header.kind in (Kind.HELLO, Kind.REQUEST):
                self._error(identity, ErrorCode.SHUTTING_DOWN, "server is shutting down", header)
            elif header.kind == Kind.HELLO:
                self._on_hello(identity, peer, header)
            elif header.kind == Kind.REQUEST:
                self._on_request(identity, peer, header)
            else:
                raise ProtocolError(f"clients do not send {header.kind.name} messages")
        except ProtocolError as exc:
            self._error(identity, ErrorCode(exc.code), str(exc), header)
        except Exception as exc:  # a bug handling one message must not take the server down
            log.exception("failed to handle a message")
            self._error(identity, ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", header)

    def _error(self, identity: bytes, code: ErrorCode, message: str, about: Header | None, **extra: Any) -> None:
        # Carrying the batch coordinates lets the client tie the error to its request and retry it.
        if self.delivery is not None:
            self.delivery.error(identity, {"code": int(code), "message": message, **header_where(about), **extra})

    def _on_hello(self, identity: bytes, peer: Peer, header: Header) -> None:
        hello = read_hello(header, self.jobs)
        stats = peer.stats
        stats.client_id, stats.job_id = hello.client, hello.job.job_id
        stats.rank, stats.world_size = hello.rank, hello.job.spec.world_size
        if self._plane is not None:
            granted = self.admission.granted(hello.prefetch)
            self._plane.transport.send(identity, Kind.JOB_INFO, job_info(hello.job, granted))

    def _on_request(self, identity: bytes, peer: Peer, header: Header) -> None:
        request = read_request(header, self.jobs)
        failpoints.check("engine.request")
        self.admission.note(peer, request)
        self.fleet.requested(identity, peer, request, time.monotonic())
        verdict = self.admission.decide(peer, request.key)
        if verdict in (Verdict.DEFER, Verdict.BUSY):
            self._reap()  # a send may have completed since the loop last looked: parked keys move up
            if verdict is Verdict.BUSY:
                verdict = self.admission.decide(peer, request.key)
        if verdict is Verdict.ADMIT:
            self._produce(identity, request.job, request.key)
        elif verdict is Verdict.BUSY:
            window = self.admission.window
            retry_after_s = min(1.0, max(0.01, self.stats.latency.mean_s()))
            message = f"more than max_prefetch={window} batches in flight; wait for some"
            self._error(identity, ErrorCode.BUSY, message, header, retry_after_s=retry_after_s, prefetch=window)

    def _produce(self, identity: bytes, job: OpenJob, key: BatchKey) -> None:
        """``key`` is in the client's window: send it from the cache, or have it produced."""
        now = time.monotonic()
        delivery = self.delivery
        cached = delivery.cached(key) if delivery else None
        if cached is not None and delivery is not None:
            if not delivery.send(identity, key, cached, now):
                self.admission.release(identity, key)
            return
        self._finish(self.production.want(job, key, identity, now, self._policy()))

    def _finish(self, works: list[BatchWork]) -> None:
        """Batches that left production: send each (or its error) to whoever still waits."""
        delivery = self.delivery
        for work in works:
            if delivery is None:
                raise RuntimeError("a batch finished before the engine started")  # unreachable: no requests yet
            recipients = {identity: at for identity, at in work.waiters.items() if self.admission.get(identity)}
            if work.failure is not None:
                delivery.fail(work, recipients)
                unsent = list(recipients)
            else:
                unsent = delivery.complete(work, recipients, self.config.cache_batches)
            for identity in unsent:
                self.admission.release(identity, work.key)

    def _reap(self) -> None:
        if self.delivery is None:
            return
        now = time.monotonic()
        for send in self.delivery.reap(now):
            for key in self.admission.delivered(send, now):
                job = self.jobs.get(key[0])
                if job is None:
                    self.admission.release(send.identity, key)
                else:
                    self._produce(send.identity, job, key)

    def _forget(self, identity: bytes) -> None:
        peer = self.admission.forget(identity)
        self.fleet.forget(identity)
        if peer is not None:
            self.production.abandon(identity, peer.inflight)

    # -- housekeeping and shutdown ---------------------------------------------------------------

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_housekeeping < min(0.5, self.config.task_timeout_s / 4):
            return
        self._last_housekeeping = now
        self.pool.kill_stuck(self.config.task_timeout_s)
        self.pool.respawn_due(now)
        # A silent client's queued batches are dropped and its slots freed once sends finish.
        for identity in self.admission.silent(now, self.config.client_timeout_s):
            self._forget(identity)
        for name in self.slots.destroyed:
            self.pool.forget_slot(name)
        self.slots.destroyed.clear()
        size = self.fleet.tick(self.pool, self.config, self.stats)
        if size is not None and not self._stopping:
            self.reconfigure(workers=size)
        update_gauges(self)

    def _begin_drain(self, timeout_s: float) -> None:
        log.info("draining: finishing in-flight batches for up to %.1f s", timeout_s)
        self._stopping = True
        self._drain_deadline = time.monotonic() + timeout_s
        # Batches no worker has started are answered at once, so clients can go elsewhere.
        self._finish(self.production.drain())
        self.admission.clear_deferred()

    def _drained(self) -> bool:
        if time.monotonic() >= self._drain_deadline:
            sending = self.delivery.sending if self.delivery else 0
            log.warning("drain timeout: %d batches and %d sends abandoned", self.production.in_progress, sending)
            return True
        return self.inflight_batches == 0

    def _shutdown(self, crash: str | None = None) -> None:
        self._stopping = True
        self.vitals = Vitals("crashed", self.vitals.beat, crash) if crash else Vitals("stopped", self.vitals.beat)
        self.pool.close()
        if self._plane is not None:
            self._plane.close()
        if self.delivery is not None:
            self.delivery.close()
        self.slots.close()
        self.cache.close()
        self.stopped.set()
        self._mailbox.close()
        if crash is None:
            log.info("engine stopped")
        elif self.on_crash is not None:
            self.on_crash(crash)

    # -- operator API (run on the engine thread through call()) ----------------------------------

    def reconfigure(self, **changes: Any) -> EngineSettings:
        """Apply live changes (``EngineSettings.live_fields``); return the new config."""
        new = self.config.with_changes(**changes)
        if new.workers != self.config.workers:
            self.pool.resize(new.workers)
        self.admission.window = new.max_prefetch
        self.config = new
        if self.delivery is not None:
            self.delivery.trim_cache(new.cache_batches)
        return new


def _follow(poller: zmq.Poller, registered: set[int], fds: set[int]) -> set[int]:
    """Keep the poller on exactly ``fds`` (workers come and go)."""
    for fd in registered - fds:
        poller.unregister(fd)
    for fd in fds - registered:
        poller.register(fd, zmq.POLLIN)
    return fds


def decoded_cache(config: EngineSettings, catalog: Catalog, slots_budget: int) -> DecodedCache:
    """The decoded-sample cache of the datasets declared cached, its arena sized to ``cache_bytes`` and
    cut to what the shared-memory mount holds beside the batch slots."""
    budget = int(config.cache_bytes)
    fits = min(budget, fit_budget(budget + slots_budget) - slots_budget) if budget else 0
    cached = [entry.decl.name for entry in catalog.entries if entry.decl.cache]
    return open_cache(cached, budget, fits, CONTEXT)
