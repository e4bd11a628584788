"""Fixtures: a per-test cluster of real servers, closed (and its logs shown) after the test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import Cluster


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
        if "cluster" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
