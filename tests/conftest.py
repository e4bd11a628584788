"""Fixtures: a per-test cluster of real servers, closed (and its logs shown) after the test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Cluster
from tests.s3 import AWS_VARIABLES, MotoServer, make_bucket


@pytest.fixture
def cluster(tmp_path, request) -> Iterator[Cluster]:
    """Real ``stoker serve`` processes for this test."""
    servers = Cluster(tmp_path)
    try:
        yield servers
    finally:
        servers.close()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print("---- server logs ----\n" + servers.logs())


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts servers through ``cluster`` is slow even where its module forgot to say so,
    so the fast loop (``-m "not slow"``) never starts a server."""
    for item in items:
        starts_servers = {"cluster", "s3_server"} & set(getattr(item, "fixturenames", ()))
        if starts_servers and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A real S3-compatible server (moto, a subprocess on loopback) for the whole session; its
    ``endpoint`` and ``env`` (endpoint, dummy keys, region) point a client or a server process at it."""
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def s3_env(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, str]]:
    """This process's AWS settings pointed at ``s3_server`` and nowhere else (no profile, no real
    account); stores made before are forgotten, so they pick the settings up."""
    from stoker.server.data.stores import clear_stores, configure_stores
    from tests.helpers import DEFAULTS

    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "absent-aws-credentials"))
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    clear_stores()
    configure_stores(DEFAULTS.store_config)
    yield dict(s3_server.env)
    clear_stores()


@pytest.fixture
def s3_bucket(s3_server: MotoServer) -> str:
    """A new, empty bucket on ``s3_server``; its name."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    make_bucket(s3_server.endpoint, name)
    return name
