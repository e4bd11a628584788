"""The HTTP app in-process through FastAPI's TestClient: the app's lifespan starts a real engine (worker
processes, data socket); no uvicorn, no server subprocess. Real uvicorn is covered by
tests/integration/test_http.py."""

from __future__ import annotations

import logging
import typing
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from stoker.server.control import create_app
from stoker.server.data.catalog import Catalog
from stoker.server.engine import Engine
from stoker.server.engine.status_models import Status
from stoker.server.settings import ServerSettings, load_settings
from tests.helpers import DEMO_DATA, wait_until

TOKEN = "unit-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def settings() -> ServerSettings:
    return load_settings(
        env={},
        overrides={
            "bind": "tcp://127.0.0.1:0",
            "workers": 1,
            "max_workers": 3,
            "max_shm_mb": 64,
            "http_token": TOKEN,
            "http_public_reads": True,  # reads as on a trusted network; changes still need the token
            "datasets": {"demo": {"path": str(DEMO_DATA)}},
        },
    )


@pytest.fixture(scope="module")
def client(settings: ServerSettings) -> Iterator[TestClient]:
    engine = Engine(settings.engine_config(), Catalog.load(settings.dataset_decls()), settings.pipeline_map())
    level = logging.getLogger("stoker").level
    try:
        with TestClient(create_app(engine, settings, http_url="http://testserver")) as http:
            # The app answers at once; the engine and the catalog come up in the background.
            wait_until(lambda: http.get("/readyz").status_code == 200, timeout_s=120, what="the app ready")
            yield http
    finally:
        logging.getLogger("stoker").setLevel(level)


def another_value(name: str, current: Any) -> Any:
    """A valid value different from ``current`` for live field ``name``, from its declaration."""
    info = ServerSettings.model_fields[name]
    annotation = info.annotation
    if typing.get_origin(annotation) is typing.Literal:
        return next(choice for choice in typing.get_args(annotation) if choice != current)
    if annotation is float:
        return current * 2
    high = next((m.le for m in info.metadata if hasattr(m, "le")), None)
    return current - 1 if high is not None and current + 1 > high else current + 1


def test_probes(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["endpoint"].startswith("tcp://127.0.0.1:")


def test_every_live_field_is_readable_patchable_and_shown_in_status(client: TestClient) -> None:
    live = ServerSettings.live_fields
    assert {"workers", "max_prefetch", "on_error", "cache_batches", "client_timeout_s", "log_level"} <= set(live)
    config = client.get("/config").json()
    assert set(config) == set(live), "GET /config is exactly the live fields"
    for name in live:
        value = another_value(name, config[name])
        response = client.patch("/config", json={name: value}, headers=AUTH)
        assert response.status_code == 200, (name, response.text)
        assert response.json()[name] == value
        assert client.get("/config").json()[name] == value, name
        assert client.get("/status").json()["config"][name] == value, name
        config[name] = value


def test_patching_needs_the_token_and_valid_values(client: TestClient) -> None:
    before = client.get("/config").json()
    assert client.patch("/config", json={"max_prefetch": 3}).status_code == 401
    assert client.patch("/config", json={"max_prefetch": 3}, headers={"Authorization": "Bearer no"}).status_code == 401
    for patch, needle in (
        ({"workers": 0}, "greater than or equal to 1"),
        ({"workers": 4}, "less than or equal to 3"),
        ({"on_error": "ignore"}, "'skip' or 'raise'"),
        ({"client_timeout_s": 0}, "greater than 0"),
        ({"bind": "tcp://*:1"}, "Extra inputs"),
    ):
        response = client.patch("/config", json=patch, headers=AUTH)
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert needle in str(detail) and list(patch)[0] in str(detail[0]["loc"])
    assert client.get("/config").json() == before


def test_status_metrics_and_documents(client: TestClient, settings: ServerSettings) -> None:
    status = Status.model_validate(client.get("/status").json())
    assert status.endpoints.http == "http://testserver" and status.datasets[0].samples == 48
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "stoker_workers " in metrics.text
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert schema["ConfigPatch"]["properties"]["workers"]["anyOf"][0]["maximum"] == settings.max_workers
    assert "client_timeout_s" in schema["LiveConfig"]["properties"]
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text
