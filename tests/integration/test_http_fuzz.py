"""Schemathesis fuzzes the HTTP API against its own OpenAPI schema on a real server: no 500s, and
every response matches what the schema documents."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from stoker.server.tools.launcher import ServerProcess
from tests.helpers import Cluster

pytestmark = pytest.mark.slow

TOKEN = "fuzz-token"


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory) -> Iterator[ServerProcess]:
    servers = Cluster(tmp_path_factory.mktemp("fuzz"))
    try:
        # As off loopback: every endpoint but the probes needs the token (the fuzzer also checks that
        # each one refuses a request without it).
        yield servers.start("--http-token", TOKEN, "--max-workers", "3", workers=1)
    finally:
        servers.close()


def test_api_conforms_to_its_schema(fuzzed_server: ServerProcess) -> None:
    # Schemathesis' pytest plugin does not support this pytest yet, so drive its strategies directly.
    schema = schemathesis.openapi.from_url(
        fuzzed_server.http + "/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/healthz", "/readyz", "/status", "/metrics", "/config", "/"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case) -> None:
            case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)

        check()
