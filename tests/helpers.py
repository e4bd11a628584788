"""Shared test helpers: start real ``stoker serve`` processes on loopback and talk to them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from stoker.server.tools.launcher import ServerProcess, start_server

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "server" / "demo-data"
ODD_DATA = Path(__file__).resolve().parent / "data" / "odd"
START_TIMEOUT_S = 120.0


class Cluster:
    """Real servers started for one test; each binds port 0 (or a port it had) on loopback."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.servers: list[ServerProcess] = []
        self._args: dict[int, list[str]] = {}
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
        server = start_server(full, timeout_s=START_TIMEOUT_S, env={**os.environ, **(env or {})}, stderr=log.fileno())
        self.servers.append(server)
        self._args[id(server)] = full
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
        return self.start(*rest, datasets={}, workers=int(workers), bind=server.data)

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


def run_cli(
    *args: str, timeout_s: float = 300.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the ``stoker`` command (as ``python -m stoker.server``) and capture its output."""
    import sys

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
    import time

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
    import shutil

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
