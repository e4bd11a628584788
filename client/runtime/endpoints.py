"""Where the servers are: ``tcp://HOST:PORT``, ``ipc://PATH``, or ``dns+tcp://NAME:PORT``.

``dns+tcp://NAME:PORT`` stands for every address ``NAME`` resolves to, which is how a Kubernetes
headless Service or a compose service name lists its replicas. It is resolved again periodically,
so servers added while training runs start getting requests, and removed ones stop.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass

__all__ = ["EndpointSource", "parse_endpoints"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EndpointSource:
    """One endpoint as the user wrote it."""

    raw: str
    host: str = ""
    port: int = 0

    @property
    def dynamic(self) -> bool:
        """Whether it is resolved through DNS (and re-resolved periodically)."""
        return self.raw.startswith("dns+tcp://")

    def resolve(self) -> list[str]:
        """The ZeroMQ endpoints it stands for now; raises ``OSError`` when DNS fails."""
        if not self.dynamic:
            return [self.raw]
        infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        addresses = sorted({info[4][0] for info in infos})
        return [_tcp(address, self.port) for address in addresses]


def _tcp(address: str, port: int) -> str:
    return f"tcp://[{address}]:{port}" if ipaddress.ip_address(address).version == 6 else f"tcp://{address}:{port}"


def parse_endpoints(endpoints: list[str]) -> list[EndpointSource]:
    """Check endpoint strings; raise ``ValueError`` naming a malformed one."""
    sources = []
    for raw in endpoints:
        if not isinstance(raw, str):
            raise ValueError(f"endpoint {raw!r} must be a string such as tcp://host:5555")
        if raw.startswith("dns+tcp://"):
            host, sep, port = raw[len("dns+tcp://") :].rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"endpoint {raw!r} must be dns+tcp://NAME:PORT")
            sources.append(EndpointSource(raw, host.strip("[]"), int(port)))
        elif raw.startswith(("tcp://", "ipc://")):
            sources.append(EndpointSource(raw))
        else:
            raise ValueError(f"endpoint {raw!r} must start with tcp://, ipc:// or dns+tcp://")
    if not sources:
        raise ValueError("endpoints must name at least one server")
    return sources
