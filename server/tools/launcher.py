"""Start ``stoker serve`` as a child process and learn where it listens (used by demo and bench).

The child binds port 0 and writes its endpoints to a ready file once its workers are up, so the
parent never guesses a free port and never sleeps: it waits for the file, or for the child to die.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ServerProcess", "start_server", "loopback_args"]

log = logging.getLogger(__name__)


@dataclass
class ServerProcess:
    """A running ``stoker serve`` child: its process and the endpoints it reported."""

    process: subprocess.Popen[bytes]
    data: str
    http: str
    ready_file: Path

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, wait ``timeout_s``, then SIGKILL; return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("server %d ignored SIGTERM for %.0f s; killing it", self.process.pid, timeout_s)
                self.process.kill()
                self.process.wait(5.0)
        self.ready_file.unlink(missing_ok=True)
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def loopback_args(dataset: str, path: str | Path, workers: int) -> list[str]:
    """``stoker serve`` flags for one dataset on loopback ports chosen by the kernel, quiet logs."""
    return [
        "--dataset", f"{dataset}={path}",
        "--bind", "tcp://127.0.0.1:0",
        "--http", "127.0.0.1:0",
        "--workers", str(workers),
        "--log-level", "WARNING",
    ]  # fmt: skip


def start_server(
    args: Sequence[str],
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
    stderr: int | None = None,
) -> ServerProcess:
    """Run ``stoker serve ARGS --ready-file F`` and wait until it is serving."""
    handle, name = tempfile.mkstemp(prefix="stoker-ready-", suffix=".json")
    os.close(handle)
    ready = Path(name)
    ready.unlink()
    command = [sys.executable, "-m", "stoker.server", "serve", *args, "--ready-file", str(ready)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if process.poll() is not None:
            raise RuntimeError(f"stoker serve exited with code {process.returncode} before serving: {command}")
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"stoker serve not ready within {timeout_s} s: {command}")
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(0.05)  # wakes early if the child dies
    info = json.loads(ready.read_text())
    return ServerProcess(process, info["data"], info["http"], ready)
