"""Facts about the host the server runs on, which settings take their defaults from."""

from __future__ import annotations

import ipaddress
import math
import os
from pathlib import Path

__all__ = ["usable_cores", "parse_http", "is_loopback", "bind_host", "default_index_dir"]


def usable_cores() -> int:
    """CPU cores this process may use: its affinity mask (cgroup cpusets), capped by a cgroup v2 CPU
    quota (``docker --cpus``, Kubernetes CPU limits), which the mask does not show."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def parse_http(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) to ``(host, port)``."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ValueError(f"http={value!r} must be HOST:PORT with a port in [0, 65535]")
    return host.strip("[]"), int(port)


def bind_host(bind: str) -> str | None:
    """The host of a ``tcp://HOST:PORT`` data endpoint (``None`` for ``ipc://``)."""
    if not bind.startswith("tcp://"):
        return None
    return bind[len("tcp://") :].rpartition(":")[0].strip("[]")


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts local connections."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_index_dir() -> str:
    """``$XDG_CACHE_HOME/stoker/index`` (``~/.cache/stoker/index`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "stoker", "index")
