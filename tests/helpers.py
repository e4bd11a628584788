"""Shared test helpers: start real ``stoker serve`` processes on loopback and talk to them."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import zmq
from prometheus_client.parser import text_string_to_metric_families

from stoker.client import RemoteBatches
from stoker.server.settings import EngineSettings
from stoker.server.tools.launcher import ServerProcess, start_server

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "server" / "demo-data"
ODD_DATA = Path(__file__).resolve().parent / "data" / "odd"
START_TIMEOUT_S = 120.0
CLIENT_TIMEOUT_S = 60.0
# What every test client asks for unless it says otherwise: small uint8 batches on the CPU, with the
# sample indices, so that tests compare bytes and count samples. A test overrides only what it is about.
CLIENT_OPTIONS: dict[str, Any] = dict(
    batch_size=4,
    image_size=64,
    device="cpu",
    normalize=False,
    return_indices=True,
    timeout_s=CLIENT_TIMEOUT_S,
)

Batch = tuple[torch.Tensor, ...]
DEFAULTS = EngineSettings(workers=1)
"""The settings' defaults: where tests take decode limits and store settings from."""
LIMITS = DEFAULTS.limits


class Cluster:
    """Real servers started for one test; each binds port 0 (or a port it had) on loopback."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.servers: list[ServerProcess] = []
        self._args: dict[int, list[str]] = {}
        self._env: dict[int, dict[str, str]] = {}
        self._logs: list[Any] = []

    def start(
        self,
        *args: str,
        datasets: dict[str, Path] | None = None,
        workers: int = 2,
        bind: str = "tcp://127.0.0.1:0",
        env: dict[str, str] | None = None,
        env_http: str = "127.0.0.1:0",
    ) -> ServerProcess:
        """Start ``stoker serve`` and wait until it reports its endpoints."""
        full = ["--bind", bind, "--http", env_http, "--workers", str(workers), "--log-level", "INFO"]
        for name, path in ({"demo": DEMO_DATA} if datasets is None else datasets).items():
            full += ["--dataset", f"{name}={path}"]
        full += list(args)
        # Kept open for the server's lifetime; close() closes it.
        log = open(self.log_dir / f"server-{len(self._logs)}.log", "wb")  # noqa: SIM115
        self._logs.append(log)
        # Index caches go next to the logs, not into the home directory, unless a test says otherwise.
        environment = {**os.environ, "STOKER_INDEX_DIR": str(self.log_dir / "index"), **(env or {})}
        server = start_server(full, timeout_s=START_TIMEOUT_S, env=environment, stderr=log.fileno())
        self.servers.append(server)
        self._args[id(server)] = full
        self._env[id(server)] = dict(env or {})
        return server

    def kill(self, server: ServerProcess) -> None:
        """SIGKILL the server process (no drain, no cleanup)."""
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(30)

    def restart(self, server: ServerProcess) -> ServerProcess:
        """Start a server again on the same data endpoint as ``server`` had."""
        args = self._args[id(server)]
        workers = args[args.index("--workers") + 1]
        # start() adds --bind/--http/--workers/--log-level; the other flags pass through unchanged.
        rest = _drop_pairs(args, {"--bind", "--http", "--workers", "--log-level"})
        return self.start(*rest, datasets={}, workers=int(workers), bind=server.data, env=self._env[id(server)])

    def logs(self) -> str:
        """Everything the servers wrote to stderr (shown when a test fails)."""
        out = []
        for log in self._logs:
            if not log.closed:
                log.flush()
            out.append(Path(log.name).read_text(errors="replace"))
        return "\n".join(out)

    def close(self) -> None:
        """Stop every server (SIGTERM, then SIGKILL after a bound)."""
        for server in self.servers:
            server.stop(timeout_s=30)
        for log in self._logs:
            log.close()


def _drop_pairs(args: list[str], flags: set[str]) -> list[str]:
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in flags:
            skip = True
            continue
        out.append(arg)
    return out


@contextlib.contextmanager
def dealer(endpoint: str, timeout_ms: int = 30_000) -> Iterator[zmq.Socket]:
    """A raw DEALER socket connected to ``endpoint``, for speaking the wire format by hand: every
    receive fails after ``timeout_ms`` instead of hanging; closed (linger 0) with its context."""
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, timeout_ms)
    socket.connect(endpoint)
    try:
        yield socket
    finally:
        socket.close()
        context.term()


def open_client(endpoints: str | Sequence[str], dataset: str = "demo", **overrides: Any) -> RemoteBatches:
    """A ``RemoteBatches`` with :data:`CLIENT_OPTIONS`, changed by ``overrides``."""
    return RemoteBatches(endpoints, dataset, **(CLIENT_OPTIONS | overrides))


def fetch_epoch(
    endpoints: str | Sequence[str], dataset: str = "demo", *, epoch: int | None = None, **overrides: Any
) -> list[Batch]:
    """Every batch of one epoch (the client's first, or ``epoch``) from a fresh client."""
    with open_client(endpoints, dataset, **overrides) as batches:
        if epoch is not None:
            batches.set_epoch(epoch)
        return list(batches)


def fetch_epochs(
    endpoints: str | Sequence[str], count: int, dataset: str = "demo", **overrides: Any
) -> list[list[Batch]]:
    """The batches of the first ``count`` epochs, one list per epoch, from one client."""
    with open_client(endpoints, dataset, **overrides) as batches:
        return [list(batches) for _ in range(count)]


def interrupted_epoch(
    endpoints: str | Sequence[str], dataset: str = "demo", *, stop_after: int, **overrides: Any
) -> list[Batch]:
    """One epoch as a restarted trainer sees it: ``stop_after`` batches from one client, its
    ``state_dict()``, then the rest from a fresh client that loaded it."""
    with open_client(endpoints, dataset, **overrides) as first:
        iterator = iter(first)
        taken = [next(iterator) for _ in range(stop_after)]
        state = first.state_dict()
    with open_client(endpoints, dataset, **overrides) as resumed:
        resumed.load_state_dict(state)
        return taken + list(resumed)


class BackgroundClient(threading.Thread):
    """A client streaming epochs in a thread of its own while the test does something to the servers.

    It iterates ``epochs`` epochs (``None``: until :meth:`stop`) of an :func:`open_client` client and
    records each epoch's sample indices in :attr:`indices` (and its batches in :attr:`batches` with
    ``keep_batches=True``). After the n-th batch (counted over all epochs) for each n in ``pause_at``
    it pauses: :meth:`wait_paused` (or :meth:`next_pause`) in the test thread returns n, and the client
    goes on once the test calls :meth:`release`. ``step_s`` is a training step's time per batch.
    Pauses and the end of the stream travel on one queue, so a finished client is never taken for a
    paused one. :meth:`result` joins with a bound and re-raises what the client raised. Use it as a
    context manager: leaving the block stops and releases the client and joins it.
    """

    _END = -1  # on the events queue: the client finished (or failed) and pauses no more

    def __init__(
        self,
        endpoints: str | Sequence[str],
        dataset: str = "demo",
        *,
        epochs: int | None = 1,
        pause_at: Iterable[int] = (),
        step_s: float = 0.0,
        keep_batches: bool = False,
        **overrides: Any,
    ) -> None:
        if not overrides.get("return_indices", True):
            raise ValueError("a BackgroundClient records sample indices: it needs return_indices=True")
        super().__init__(name="background-client", daemon=True)
        self.endpoints, self.dataset, self.epochs = endpoints, dataset, epochs
        self.pause_at = frozenset(pause_at)
        self.step_s, self.keep_batches, self.overrides = step_s, keep_batches, overrides
        self.indices: list[list[int]] = []
        self.batches: list[list[Batch]] = []
        self.error: BaseException | None = None
        self._events: queue.Queue[int] = queue.Queue()
        self._released = threading.Semaphore(0)
        self._stopping = threading.Event()  # not _stop: Thread has a _stop() of its own

    def run(self) -> None:
        try:
            with open_client(self.endpoints, self.dataset, **self.overrides) as batches:
                received, epoch = 0, 0
                while not self._stopping.is_set() and (self.epochs is None or epoch < self.epochs):
                    self.indices.append([])
                    if self.keep_batches:
                        self.batches.append([])
                    for batch in batches:
                        self.indices[-1] += batch[2].tolist()
                        if self.keep_batches:
                            self.batches[-1].append(batch)
                        received += 1
                        if received in self.pause_at:
                            self._pause(received)
                        if self._stopping.is_set():
                            break
                        if self.step_s:
                            self._stopping.wait(self.step_s)  # a training step: busy, not waiting on stoker
                    epoch += 1
        except BaseException as exc:  # handed to the test thread by result()
            self.error = exc
        finally:
            self._events.put(self._END)

    def _pause(self, received: int) -> None:
        self._events.put(received)
        if not self._released.acquire(timeout=self.timeout_s):
            raise TimeoutError(f"paused after batch {received} and never released")

    @property
    def timeout_s(self) -> float:
        """The client's own bound on every wait (its ``timeout_s``)."""
        return float(self.overrides.get("timeout_s", CLIENT_OPTIONS["timeout_s"]))

    def next_pause(self, timeout_s: float) -> int | None:
        """The batch count at which the client paused next, or ``None`` once it finished instead;
        ``TimeoutError`` if neither happens within ``timeout_s``."""
        try:
            event = self._events.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"the client neither paused nor finished within {timeout_s} s") from None
        if event == self._END:
            self._events.put(event)  # finished for good: every later call says so too
            return None
        return event

    def wait_paused(self, timeout_s: float = 120.0) -> int:
        """Wait for the client's next pause and return its batch count; fail if it finished instead."""
        paused = self.next_pause(timeout_s)
        if paused is None:
            self.result(30)  # re-raises the client's error, if that is why it stopped
            raise AssertionError("the client finished without reaching its pause")
        return paused

    def release(self) -> None:
        """Let the paused client go on."""
        self._released.release()

    def stop(self) -> None:
        """Ask the client to stop after the batch it is on (and not to wait at a pause)."""
        self._stopping.set()
        self._released.release()

    def result(self, timeout_s: float = 120.0) -> list[list[int]]:
        """Join (within ``timeout_s``), re-raise the client's error, else return :attr:`indices`."""
        self.join(timeout_s)
        if self.is_alive():
            raise AssertionError(f"the client did not finish within {timeout_s} s")
        if self.error is not None:
            raise self.error
        return self.indices

    def __enter__(self) -> BackgroundClient:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        self.stop()
        self.join(self.timeout_s + 30)
        if exc_type is None and self.is_alive():
            raise AssertionError("the client did not stop")


def http_json(
    url: str, method: str = "GET", body: Any = None, token: str | None = None, timeout_s: float = 10.0
) -> tuple[int, Any]:
    """Send an HTTP request; return ``(status, decoded JSON or text)``."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            raw, status = response.read(), response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def metrics(url: str) -> dict[str, float]:
    """The server's ``/metrics``: ``{"name|label=value...": value}``."""
    status, text = http_json(url + "/metrics")
    assert status == 200, text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + "".join(f"|{k}={v}" for k, v in sorted(sample.labels.items()))
            values[key] = sample.value
    return values


def run_cli(
    *args: str, timeout_s: float = 300.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the ``stoker`` command (as ``python -m stoker.server``) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "stoker.server", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **(env or {})},
    )


def process_tree_rss_mb(pid: int, field: str = "Pss") -> float:
    """Memory of a process and all its descendants, in MB (Linux /proc): ``Pss`` (shared pages split
    between the processes sharing them, so torch loaded once in the forkserver is not counted per
    worker) or ``Rss``."""
    from stoker.server.tools.measure import memory_mb

    return memory_mb(pid, field)


def wait_until(predicate, timeout_s: float = 30.0, interval_s: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def make_bad_dataset(root: Path) -> tuple[Path, list[str]]:
    """An ImageFolder of demo photos plus broken files; returns the root and the bad files' names."""
    good = sorted(DEMO_DATA.rglob("*.jpg"))
    for i, photo in enumerate(good[:30]):
        target = root / ("a" if i % 2 else "b") / photo.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, target)
    bad = [
        "truncated_50pct_coffee.jpg",
        "zero_bytes.jpg",
        "text_file.jpg",
        "corrupt_scan_data_coffee.jpg",
        "html_error_page.jpg",
    ]
    for name in bad:
        shutil.copy(ODD_DATA / name, root / "b" / name)
    return root, bad
