"""``stoker serve``: load the catalog, start the engine and the HTTP side, run until signalled."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

from stoker.client.protocol.keys import load_key_pair
from stoker.server.data.catalog import Catalog
from stoker.server.engine import Engine
from stoker.server.settings import ServerSettings, bind_host, is_loopback, parse_http

__all__ = ["serve", "build_engine", "bind_http", "ServeError", "configure_logging"]

log = logging.getLogger(__name__)


class ServeError(Exception):
    """The server cannot start as configured; the message says why."""

    @property
    def origin(self) -> str | None:
        """The traceback of what raised first, when that was code other than stoker's checks (an
        operator's plugin): what an operator needs to fix it. ``None`` for a plain configuration error."""
        cause = self.__cause__
        if cause is None or cause.__cause__ is None:
            return None
        return "".join(traceback.format_exception(cause.__cause__))


def bind_http(address: str) -> socket.socket:
    """Bind and listen on ``HOST:PORT`` now, so port 0 resolves before anyone is told the address."""
    host, port = parse_http(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot bind HTTP to {address}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _announce(settings: ServerSettings, http_url: str) -> Callable[[Engine], None]:
    def on_ready(engine: Engine) -> None:
        info = {"data": engine.endpoint, "http": http_url, "pid": os.getpid()}
        if settings.ready_file:
            path = Path(settings.ready_file)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps(info))
            tmp.replace(path)  # atomic: a reader never sees half a file
        log.info("stoker serving data=%s http=%s", engine.endpoint, http_url)

    return on_ready


def check_security(settings: ServerSettings) -> None:
    """Refuse what would expose the data or the control plane to the network by accident."""
    host, _ = parse_http(settings.http)
    if not is_loopback(host) and settings.http_token is None:
        raise ServeError(
            f"refusing to serve HTTP on non-loopback {settings.http} without a token: set --http-token-file "
            "or STOKER_HTTP_TOKEN (status, metrics and PATCH /config would be open to the network)"
        )
    if (settings.http_tls_cert_file is None) != (settings.http_tls_key_file is None):
        raise ServeError("HTTPS needs both --http-tls-cert and --http-tls-key")
    for path in (settings.http_tls_cert_file, settings.http_tls_key_file):
        if path is not None and not os.access(path, os.R_OK):
            raise ServeError(f"cannot read the TLS file {path!r}")
    curve, folder = settings.curve_secret_key_file, settings.authorized_clients
    if (curve is None) != (folder is None):
        raise ServeError(
            "CURVE needs both --curve-secret-key FILE (the server's secret certificate) and "
            "--authorized-clients DIR (the clients' public certificates)"
        )
    if curve is not None and folder is not None:
        if not Path(folder).is_dir():
            raise ServeError(f"--authorized-clients {folder!r} is not a folder")
        try:
            load_key_pair(curve)
        except ValueError as exc:
            raise ServeError(f"--curve-secret-key: {exc}") from None
        return
    data_host = bind_host(settings.bind)
    if data_host is not None and not is_loopback(data_host) and not settings.allow_unauthenticated:
        raise ServeError(
            f"refusing to serve the data socket on non-loopback {settings.bind} without CURVE keys: anyone who "
            "reaches it could read every declared dataset. Give --curve-secret-key and --authorized-clients "
            "(stoker keys generate DIR makes keys), or say --allow-unauthenticated"
        )
    if data_host is not None and not is_loopback(data_host):
        log.warning("serving %s without authentication or encryption (--allow-unauthenticated)", settings.bind)


def build_engine(settings: ServerSettings) -> Engine:
    """Check what must hold before serving, load the catalog and build (not start) the engine."""
    if not settings.datasets:
        raise ServeError("no dataset declared: use --dataset NAME=PATH or [datasets.NAME] in --config")
    try:
        pipelines = settings.pipeline_map()
        with_code = [pipeline for pipeline in pipelines.values() if pipeline.has_post_ops]
        if with_code:
            from stoker.server.imaging.postops import validate_pipelines  # torchvision, only when needed

            validate_pipelines(with_code)
        decls = settings.dataset_decls()
        for decl in decls:
            decl.check()  # what needs no listing fails now; the listing runs once the server answers
        mixtures = settings.mixture_decls()
    except (ValueError, OSError) as exc:
        raise ServeError(str(exc)) from exc
    check_security(settings)  # after the configuration's own errors, which a user fixes first
    catalog = Catalog(decls=decls, index_dir=settings.index_dir, mixtures=mixtures)
    return Engine(settings.engine_config(), catalog, pipelines)


def serve(settings: ServerSettings) -> int:
    """Run a server in this process until SIGTERM/SIGINT; return the exit status."""
    import uvicorn

    from stoker.server.control import create_app

    engine = build_engine(settings)
    sock = bind_http(settings.http)
    bound_host, bound_port = sock.getsockname()[:2]
    scheme = "https" if settings.http_tls_cert_file else "http"
    http_url = f"{scheme}://{'[' + bound_host + ']' if ':' in bound_host else bound_host}:{bound_port}"
    # Said at once: /healthz answers while workers start and datasets are listed, before the ready file.
    log.info("HTTP listening on %s", http_url)
    failure: list[str] = []
    crashed: list[str] = []
    server: uvicorn.Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True  # uvicorn stops at its next tick, draining the engine

    def on_failed(reason: str) -> None:
        failure.append(reason)
        stop()

    def on_crash(reason: str) -> None:
        # The engine is gone: this process can serve nothing. It says so on /healthz (and /readyz) for
        # drain_timeout_s, so probes and operators see why, then exits non-zero to be restarted.
        crashed.append(reason)
        log.critical("the engine died (%s); exiting in %.1f s", reason, settings.drain_timeout_s)
        timer = threading.Timer(settings.drain_timeout_s, stop)
        timer.daemon = True
        timer.start()

    engine.on_crash = on_crash

    app = create_app(engine, settings, http_url=http_url, on_ready=_announce(settings, http_url), on_failed=on_failed)
    config = uvicorn.Config(
        app,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=5,
        lifespan="on",
        ssl_certfile=settings.http_tls_cert_file,
        ssl_keyfile=settings.http_tls_key_file,
    )
    server = uvicorn.Server(config)
    received: list[int] = []
    # uvicorn handles SIGINT/SIGTERM while it runs (graceful shutdown, which drains the engine) and
    # re-raises the signal afterwards; these handlers only note it, so a drained stop exits 0.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda number, frame: received.append(number))
    server.run(sockets=[sock])
    if received:
        log.info("stopped by signal %d", received[0])
    if failure:
        raise ServeError(failure[0])
    if crashed:
        return 1
    # uvicorn reports a failed lifespan start-up by not starting.
    return 0 if server.started else 1


def configure_logging(level: str) -> None:
    """Log to stderr with timestamps; the CLI's stdout stays for results."""
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
