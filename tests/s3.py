"""S3 test parts: a real moto S3 server in a subprocess and bucket setup over plain HTTP; the TCP relay
that delays every request (a store some milliseconds away) is :class:`tests.relay.DelayRelay`.

The moto server binds port 0 in its own process and prints the endpoint it got; the parent reads that
line with a bounded wait. Nothing here mocks a storage client: code under test speaks real HTTP.
"""

from __future__ import annotations

import http.client
import http.server
import logging
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

from tests.relay import DelayRelay

__all__ = [
    "AWS_VARIABLES",
    "DelayRelay",
    "MotoServer",
    "Reply",
    "ScriptedServer",
    "Seen",
    "make_bucket",
    "put_objects",
    "s3_environment",
]

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 10.0
REGION = "us-east-1"
# Dummy credentials: moto accepts any, and tests check that these never leak into messages or logs.
ACCESS_KEY_ID = "AKIASTOKERTESTKEY0001"
SECRET_ACCESS_KEY = "stoker-test-secret-do-not-log/0123456789"
# Environment that could point a client at a real account or change its behaviour; cleared in tests.
AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_METADATA_ENDPOINT",
    "AWS_STS_ENDPOINT",
    "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_SKIP_SIGNATURE",
    "AWS_ALLOW_HTTP",
)

# Run in the child: bind port 0, print the endpoint, serve until stdin closes (the parent died or is
# done) or a signal arrives. Request logging is off: it costs the server CPU on every request.
_SERVER_SCRIPT = """
import logging, os, sys
logging.getLogger("werkzeug").setLevel(logging.WARNING)
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
server = ThreadedMotoServer("127.0.0.1", 0, verbose=False)
server.start()
host, port = server.get_host_and_port()
sys.stdout.write(f"http://{host}:{port}\\n")
sys.stdout.flush()
os.dup2(2, 1)  # anything printed later goes to the log, not to a pipe nobody reads
sys.stdin.read()
"""


def s3_environment(endpoint: str) -> dict[str, str]:
    """The environment a stoker server (or any AWS client) needs to use the store at ``endpoint``."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",  # never wait on an instance-metadata probe in tests
    }


class MotoServer:
    """A moto S3 server in a child process on loopback; ``endpoint`` is where it listens."""

    def __init__(self, log_path: Path, timeout_s: float = START_TIMEOUT_S) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115  (kept open for the child's lifetime)
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SERVER_SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        try:
            self.endpoint = self._read_endpoint(timeout_s)
        except BaseException:
            self.close()
            raise
        parts = urlsplit(self.endpoint)
        self.host: str = parts.hostname or "127.0.0.1"
        self.port: int = parts.port or 80
        log.info("moto S3 server %d at %s", self.process.pid, self.endpoint)

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point an AWS client at this server."""
        return s3_environment(self.endpoint)

    def _read_endpoint(self, timeout_s: float) -> str:
        stdout = self.process.stdout
        if stdout is None:
            raise RuntimeError("moto server has no stdout pipe")
        deadline = time.monotonic() + timeout_s
        line = b""
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"moto server printed no endpoint within {timeout_s} s; see {self.log_path}")
                if not selector.select(remaining):
                    continue
                chunk = os.read(stdout.fileno(), 256)
                if not chunk:
                    code = self.process.wait(HTTP_TIMEOUT_S)
                    raise RuntimeError(f"moto server exited with code {code} before serving; see {self.log_path}")
                line += chunk
        return line.decode().strip()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the server: SIGTERM, wait, then SIGKILL."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("moto server %d ignored SIGTERM for %.0f s; killing it", self.process.pid, timeout_s)
                self.process.kill()
                self.process.wait(timeout_s)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()
        self._log.close()

    def logs(self) -> str:
        """What the server wrote to its log so far."""
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> MotoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _request(endpoint: str, method: str, path: str, body: bytes = b"") -> None:
    parts = urlsplit(endpoint)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=HTTP_TIMEOUT_S)
    try:
        # moto checks no signature, but it needs an Authorization header to treat the caller as the
        # bucket's owner rather than as anonymous; a form content type would make it eat the body.
        headers = {
            "Authorization": f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY_ID}/20240101/{REGION}/s3/aws4_request, "
            "SignedHeaders=host, Signature=0",
            "Content-Type": "application/octet-stream",
            "Content-Length": str(len(body)),
        }
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        detail = response.read()
        if response.status >= 300:
            raise RuntimeError(f"{method} {path} answered {response.status}: {detail[:300]!r}")
    finally:
        connection.close()


def make_bucket(endpoint: str, bucket: str, objects: Mapping[str, bytes] | None = None) -> None:
    """Create ``bucket`` (if it is new) and upload ``objects`` (key to bytes) into it."""
    _request(endpoint, "PUT", f"/{bucket}")
    if objects:
        put_objects(endpoint, bucket, objects.items())


def put_objects(endpoint: str, bucket: str, objects: Iterable[tuple[str, bytes]], parallel: int = 8) -> None:
    """Upload ``(key, bytes)`` pairs, a few at a time."""
    with ThreadPoolExecutor(parallel) as pool:
        futures = [pool.submit(_request, endpoint, "PUT", f"/{bucket}/{quote(key)}", data) for key, data in objects]
        for future in futures:
            future.result(HTTP_TIMEOUT_S * 3)


@dataclass(frozen=True)
class Seen:
    """One request a :class:`ScriptedServer` received (header names in lower case)."""

    method: str
    path: str
    headers: dict[str, str]


@dataclass(frozen=True)
class Reply:
    """What a :class:`ScriptedServer` answers."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class ScriptedServer:
    """A plain HTTP server on loopback (port 0) that answers every request with ``reply(seen)`` and
    records it: a store that fails on purpose (503, 429, a 403 whose body echoes the caller's key), or
    a credentials endpoint. One connection per request (HTTP/1.0), so nothing lingers after close()."""

    def __init__(self, reply: Callable[[Seen], Reply]) -> None:
        self.requests: list[Seen] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
                owner.requests.append(seen)
                answer = reply(seen)
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(answer.body)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _answer

            def log_message(self, format: str, *args: object) -> None:
                log.debug("scripted server: " + format, *args)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="scripted-http", daemon=True
        )
        self._thread.start()

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop serving and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout_s)

    def __enter__(self) -> ScriptedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
