"""The HTTP control plane on a real uvicorn: status, metrics, live config, security, CLI summary."""

from __future__ import annotations

import time

import pytest

from tests.helpers import BackgroundClient, http_json, metrics, open_client, run_cli, wait_until

pytestmark = pytest.mark.slow


def test_streaming_while_polling_and_resizing_the_pool_loses_nothing(cluster) -> None:
    server = cluster.start("--max-workers", "4")
    changes = [{"workers": 1}, {"workers": 3}, {"max_prefetch": 2}, {"workers": 2}]
    # The client pauses after batches 15, 30, 45 and 60 for the next change; the end of its stream
    # is a different event, so it is never taken for another change.
    pause_at = {15 * (n + 1) for n in range(len(changes))}
    seen_workers: set[int] = set()
    pending = iter(changes)
    with BackgroundClient(server.data, epochs=6, pause_at=pause_at, image_size=96, seed=2) as client:
        deadline = time.monotonic() + 240
        while True:
            assert time.monotonic() < deadline, "the client did not finish streaming"
            status, body = http_json(server.http + "/status")
            assert status == 200
            seen_workers.add(body["pool"]["alive"])
            metrics(server.http)
            try:
                paused = client.next_pause(timeout_s=0.1)
            except TimeoutError:  # still streaming: poll again
                continue
            if paused is None:
                break
            change = next(pending)
            code, config = http_json(server.http + "/config", "PATCH", change)
            assert code == 200, config
            assert all(config[key] == value for key, value in change.items())
            if "workers" in change:  # the pool converges while the client keeps streaming
                wait_until(
                    lambda change=change: http_json(server.http + "/status")[1]["pool"]["alive"] == change["workers"],
                    timeout_s=30,
                    interval_s=0.05,
                    what=f"the pool to reach {change['workers']} workers",
                )
                seen_workers.add(change["workers"])
            client.release()
        epochs = client.result(30)
    assert next(pending, None) is None, "every change was made while the client streamed"
    for epoch in epochs:
        assert sorted(epoch) == list(range(48)), "every sample exactly once in every epoch"
    assert 1 in seen_workers and max(seen_workers) >= 3, seen_workers
    final = http_json(server.http + "/status")[1]
    assert final["pool"]["size"] == 2 and final["config"]["max_prefetch"] == 2
    assert final["pool"]["restarts"] == 0, "retiring workers are not restarts"
    values = metrics(server.http)
    # Six epochs, plus at most a prefetch window (4 batches of 4) already asked for of the seventh.
    images = values["stoker_images_served_total"]
    assert 6 * 48 <= images <= 6 * 48 + 16
    assert 6 * 12 <= values["stoker_batches_served_total"] <= 6 * 12 + 4
    assert values["stoker_bytes_served_total"] == images * 96 * 96 * 3
    assert values["stoker_stage_seconds_count|stage=decode"] >= 6 * 48
    assert values["stoker_workers"] >= 1
    assert "config change: workers 2 -> 1" in cluster.logs()


def test_status_shows_clients_stages_and_stall(cluster) -> None:
    server = cluster.start()
    with open_client(server.data, batch_size=8, image_size=64) as b:
        for _ in b:
            time.sleep(0.01)  # a training step, so the stall share is below 1
        status = http_json(server.http + "/status")[1]
    assert status["ready"] and status["endpoints"]["data"] == server.data
    assert status["endpoints"]["http"] == server.http
    (dataset,) = status["datasets"]
    assert {k: dataset[k] for k in ("name", "samples", "classes", "fingerprint", "state")} == {
        "name": "demo",
        "samples": 48,
        "classes": 6,
        "fingerprint": dataset["fingerprint"],
        "state": "ready",
    }
    assert status["jobs"][0]["batches_per_rank"] == 6
    (client,) = status["clients"]
    # The client runs ahead into the next epoch by up to `prefetch` (4) batches.
    assert 6 <= client["batches"] <= 10 and client["images"] == 8 * client["batches"]
    assert client["stall_share"] is not None and 0 < client["stall_share"] < 1
    for stage in ("read", "decode", "augment", "batch", "send"):
        assert status["stages"][stage]["count"] > 0 and status["stages"][stage]["mean_ms"] > 0
    assert status["config"]["log_level"] == "INFO"


def test_invalid_config_changes_are_422_and_change_nothing(cluster) -> None:
    server = cluster.start("--max-workers", "3")
    before = http_json(server.http + "/config")[1]
    for patch, needle in (
        ({"workers": 0}, "greater than or equal to 1"),
        ({"workers": 9}, "less than or equal to 3"),
        ({"on_error": "ignore"}, "'skip' or 'raise'"),
        ({"max_prefetch": "many"}, "valid integer"),
        ({"threads": 4}, "Extra inputs"),
    ):
        code, body = http_json(server.http + "/config", "PATCH", patch)
        assert code == 422, body
        assert needle in str(body["detail"]) and list(patch)[0] in str(body["detail"][0]["loc"])
    assert http_json(server.http + "/config")[1] == before


def test_readyz_and_healthz(cluster) -> None:
    server = cluster.start()
    assert http_json(server.http + "/healthz") == (200, {"status": "ok"})
    code, body = http_json(server.http + "/readyz")
    assert code == 200 and body["endpoint"] == server.data


def test_non_loopback_http_needs_a_token(cluster) -> None:
    result = run_cli("serve", "--dataset", "demo=server/demo-data", "--http", "0.0.0.0:0", timeout_s=60)
    assert result.returncode == 2 and "without a token" in result.stderr
    server = cluster.start("--http-token", "s3cret")
    assert http_json(server.http + "/config", "PATCH", {"max_prefetch": 3})[0] == 401
    assert http_json(server.http + "/config", "PATCH", {"max_prefetch": 3}, token="wrong")[0] == 401
    code, body = http_json(server.http + "/config", "PATCH", {"max_prefetch": 3}, token="s3cret")
    assert code == 200 and body["max_prefetch"] == 3
    assert http_json(server.http + "/status")[0] == 401  # with a token, reads need it too
    assert http_json(server.http + "/status", token="s3cret")[0] == 200
    assert http_json(server.http + "/healthz")[0] == 200  # the probes never do


def test_token_from_environment_and_non_loopback_bind(cluster) -> None:
    server = cluster.start(env_http="0.0.0.0:0", env={"STOKER_HTTP_TOKEN": "from-env"})
    port = server.http.rsplit(":", 1)[1]
    local = f"http://127.0.0.1:{port}"
    assert http_json(local + "/config", "PATCH", {"cache_batches": 2})[0] == 401
    assert http_json(local + "/config", "PATCH", {"cache_batches": 2}, token="from-env")[0] == 200


def test_stoker_status_prints_a_summary(cluster) -> None:
    server = cluster.start()
    with open_client(server.data, batch_size=16, image_size=32) as b:
        list(b)
        result = run_cli("status", server.http, timeout_s=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "ready" in out and "workers 2/2 alive" in out
    assert "client" in out and "stall" in out and "decode" in out
    assert run_cli("status", "http://127.0.0.1:9", timeout_s=60).returncode == 1


@pytest.mark.parametrize("path", ["/openapi.json", "/"])
def test_documents_are_served(cluster, path: str) -> None:
    server = cluster.start()
    code, body = http_json(server.http + path)
    assert code == 200
    if path == "/":
        assert "<canvas" in body and 'fetch("status"' in body and "https://" not in body
    else:
        assert "Status" in body["components"]["schemas"]
