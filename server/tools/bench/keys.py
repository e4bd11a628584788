"""Throw-away CURVE keys for ``stoker bench --curve``: a server pair, one authorised client."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from stoker.client.protocol.keys import generate

__all__ = ["BenchKeys"]


@dataclass(frozen=True)
class BenchKeys:
    server_public: Path
    server_secret: Path
    client_public: Path
    client_secret: Path
    authorized: Path

    @classmethod
    @contextmanager
    def made(cls) -> Iterator[BenchKeys]:
        """Keys in a private temporary folder, removed afterwards."""
        root = Path(tempfile.mkdtemp(prefix="stoker-bench-keys-"))
        try:
            server_public, server_secret = generate(root / "server", "server")
            client_public, client_secret = generate(root / "client", "client")
            authorized = root / "authorized"
            authorized.mkdir()
            shutil.copy(client_public, authorized / "client.key")
            yield cls(server_public, server_secret, client_public, client_secret, authorized)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    @property
    def serve_args(self) -> list[str]:
        """``stoker serve`` flags for CURVE with these keys."""
        return ["--curve-secret-key", str(self.server_secret), "--authorized-clients", str(self.authorized)]

    @property
    def client(self) -> dict[str, str]:
        """``RemoteBatches`` keyword arguments for the authorised client."""
        return {"server_key": str(self.server_public), "client_key": str(self.client_secret)}
