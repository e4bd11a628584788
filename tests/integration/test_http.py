"""The HTTP control plane on a real uvicorn: status, metrics, live config, security, CLI summary."""

from __future__ import annotations

import queue
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stoker.client import RemoteBatches
from tests.helpers import http_json, run_cli

TIMEOUT_S = 60.0


def metrics(url: str) -> dict[str, float]:
    status, text = http_json(url + "/metrics")
    assert status == 200
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + "".join(f"|{k}={v}" for k, v in sorted(sample.labels.items()))
            values[key] = sample.value
    return values


def test_streaming_while_polling_and_resizing_the_pool_loses_nothing(cluster) -> None:
    server = cluster.start("--max-workers", "4")
    changes = [{"workers": 1}, {"workers": 3}, {"max_prefetch": 2}, {"workers": 2}]
    # The client thread asks for each change in turn ("due") and says when it is done; one queue
    # keeps the two apart, so the end of the stream is never taken for another change.
    requests: queue.Queue[str] = queue.Queue()
    applied = threading.Event()  # the main thread made the change asked for
    results: dict[str, object] = {}

    def stream() -> None:
        try:
            with RemoteBatches(
                server.data,
                "demo",
                batch_size=4,
                image_size=96,
                device="cpu",
                normalize=False,
                return_indices=True,
                timeout_s=TIMEOUT_S,
                seed=2,
            ) as batches:
                epochs, received = [], 0
                for _ in range(6):
                    epoch = []
                    for _, _, idx in batches:
                        epoch += idx.tolist()
                        received += 1
                        if received % 15 == 0 and received // 15 <= len(changes):
                            applied.clear()
                            requests.put("due")
                            assert applied.wait(30), "the main thread did not apply the change"
                    epochs.append(epoch)
                results["epochs"] = epochs
        except BaseException as exc:  # reported to the main thread
            results["error"] = exc
        finally:
            requests.put("done")

    thread = threading.Thread(target=stream)
    thread.start()
    seen_workers: set[int] = set()
    pending = iter(changes)
    deadline = time.monotonic() + 240
    while True:
        assert time.monotonic() < deadline, "the client did not finish streaming"
        status, body = http_json(server.http + "/status")
        assert status == 200
        seen_workers.add(body["pool"]["alive"])
        metrics(server.http)
        try:
            request = requests.get(timeout=0.1)
        except queue.Empty:
            continue
        if request == "done":
            break
        change = next(pending)
        code, config = http_json(server.http + "/config", "PATCH", change)
        assert code == 200, config
        assert all(config[key] == value for key, value in change.items())
        if "workers" in change:  # the pool converges while the client keeps streaming
            converged_by = time.monotonic() + 30
            while http_json(server.http + "/status")[1]["pool"]["alive"] != change["workers"]:
                assert time.monotonic() < converged_by, f"pool did not reach {change['workers']} workers"
                time.sleep(0.05)
            seen_workers.add(change["workers"])
        applied.set()
    thread.join(30)
    assert next(pending, None) is None, "every change was made while the client streamed"
    assert "error" not in results, results.get("error")
    for epoch in results["epochs"]:  # type: ignore[union-attr]
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
    with RemoteBatches(server.data, "demo", batch_size=8, image_size=64, device="cpu", timeout_s=TIMEOUT_S) as b:
        for _ in b:
            time.sleep(0.01)  # a training step, so the stall share is below 1
        status = http_json(server.http + "/status")[1]
    assert status["ready"] and status["endpoints"]["data"] == server.data
    assert status["endpoints"]["http"] == server.http
    assert status["datasets"] == [
        {"name": "demo", "samples": 48, "classes": 6, "fingerprint": status["datasets"][0]["fingerprint"]}
    ]
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
    assert http_json(server.http + "/status")[0] == 200  # read-only endpoints stay open


def test_token_from_environment_and_non_loopback_bind(cluster) -> None:
    server = cluster.start(env_http="0.0.0.0:0", env={"STOKER_HTTP_TOKEN": "from-env"})
    port = server.http.rsplit(":", 1)[1]
    local = f"http://127.0.0.1:{port}"
    assert http_json(local + "/config", "PATCH", {"cache_batches": 2})[0] == 401
    assert http_json(local + "/config", "PATCH", {"cache_batches": 2}, token="from-env")[0] == 200


def test_stoker_status_prints_a_summary(cluster) -> None:
    server = cluster.start()
    with RemoteBatches(server.data, "demo", batch_size=16, image_size=32, device="cpu", timeout_s=TIMEOUT_S) as b:
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
