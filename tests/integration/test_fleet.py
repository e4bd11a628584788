"""Running by demand on real servers, with real clients whose training step is simulated: the desired
size converges and holds, the autoscaler follows the trainers, weighted fair shares hold between
jobs, a newcomer is served at once, a greedy job cannot starve a slow one, and the verdicts say who
is the bottleneck. The issue's 60 s stability window is shortened (``--demand-window-s``, a few
seconds of sampling) to keep the suite fast; nothing in the mechanism depends on the length.
"""

from __future__ import annotations

import math
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from stoker.server.tools.status import fetch_status, format_status
from tests.helpers import DEMO_DATA, ROOT, BackgroundClient, Cluster, http_json, metrics, open_client, wait_until

pytestmark = pytest.mark.slow

WINDOW_S = 2.0
FAST = dict(batch_size=8, image_size=32, prefetch=16)
"""Small, cheap batches; a greedy client keeps the server's queue full."""
SCALED_OBJECT = ROOT / "deploy" / "kubernetes" / "demand" / "scaledobject.yaml"


def status(server) -> dict[str, Any]:
    code, body = http_json(server.http + "/status")
    assert code == 200, body
    return body


def job_of(server, dataset: str) -> dict[str, Any] | None:
    for job in status(server)["jobs"]:
        if job["dataset"] == dataset and job["verdict"] is not None:
            return job
    return None


def pace(seconds: float) -> None:
    """Let the clients run for ``seconds`` (a sampling period, not a synchronisation)."""
    until = time.monotonic() + seconds
    wait_until(lambda: time.monotonic() >= until, seconds + 5, 0.02, f"{seconds} s to pass")


class Trainer(threading.Thread):
    """A training loop: ``step_s`` of work per batch; the client's own figures are readable meanwhile."""

    def __init__(self, endpoint: str, dataset: str = "demo", step_s: float = 0.0, **options: Any) -> None:
        super().__init__(daemon=True)
        self.batches = open_client(endpoint, dataset, **(FAST | options))
        self.step_s = step_s
        self.first_batch_s: float | None = None
        self.waits: list[float] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        try:
            while not self._halt.is_set():
                iterator = iter(self.batches)
                while not self._halt.is_set():
                    asked = time.monotonic()
                    try:
                        next(iterator)
                    except StopIteration:
                        break
                    now = time.monotonic()
                    if self.first_batch_s is None:
                        self.first_batch_s = now - started
                    else:
                        self.waits.append(now - asked)
                    if self.step_s:
                        self._halt.wait(self.step_s)
        except BaseException as exc:  # re-raised by stop()
            self.error = exc

    def stop(self) -> None:
        self._halt.set()
        self.join(30)
        self.batches.close()
        assert not self.is_alive(), "the trainer did not stop"
        if self.error is not None:
            raise self.error

    def __enter__(self) -> Trainer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Any:
    """One contended server: a single worker, datasets of weight 1 (``a``, ``demo``) and 3 (``b``)."""
    folder = tmp_path_factory.mktemp("fleet")
    config = folder / "stoker.toml"
    config.write_text(
        f"[datasets.a]\npath = '{DEMO_DATA}'\n\n[datasets.b]\npath = '{DEMO_DATA}'\nweight = 3\n\n"
        f"[datasets.demo]\npath = '{DEMO_DATA}'\n"
    )
    cluster = Cluster(folder)
    try:
        yield cluster.start("--config", str(config), "--demand-window-s", str(WINDOW_S), datasets={}, workers=1)
    finally:
        cluster.close()


def settled_verdict(server, dataset: str, kind: str, timeout_s: float = 20.0) -> dict[str, Any]:
    """The job's status once its verdict is ``kind`` (a fresh window holds no start-up wait)."""

    def verdict() -> dict[str, Any] | None:
        job = job_of(server, dataset)
        return job if job is not None and job["verdict"] == kind else None

    return wait_until(verdict, timeout_s, 0.1, f"{dataset}: {kind}")


def test_a_fast_trainer_on_one_worker_is_loader_bound_and_told_how_many_to_add(shared) -> None:
    with Trainer(shared.data, "a"):
        job = settled_verdict(shared, "a", "loader-bound")
        fleet = status(shared)["fleet"]
    assert job["advice"].startswith("add ")
    added = int(job["advice"].split()[1])
    assert added >= 1 and fleet["desired_workers"] >= 2, (job, fleet)
    assert job["stall_share"] > 0.1 and job["demand_images_per_s"] > job["images_per_s"]


def test_a_slow_trainer_is_trainer_bound(shared) -> None:
    with Trainer(shared.data, "a", step_s=0.1, batch_size=4):
        job = settled_verdict(shared, "a", "trainer-bound")
        text = format_status(fetch_status(shared.http))
    assert "idle: the trainer is the bottleneck" in job["advice"], job
    # `stoker status` says it in one line per job.
    (line,) = [line for line in text.splitlines() if line.startswith(f"job {job['job_id'][:8]}")]
    assert "(a, weight 1" in line and "trainer-bound: loader" in line, text
    assert job["stall_share"] < 0.1


def test_weights_1_and_3_share_worker_time_1_to_3_and_a_newcomer_is_served_at_once(shared) -> None:
    with Trainer(shared.data, "a"), Trainer(shared.data, "b"):
        # Both contend over a full window before the shares are read.
        wait_until(lambda: (job_of(shared, "a") or {}).get("share", 0) > 0, 20, 0.1, "job a's share")
        pace(WINDOW_S + 1.0)  # a full window of contention
        ratios = []
        for _ in range(5):
            jobs = {j["dataset"]: j for j in status(shared)["jobs"]}
            ratios.append(jobs["b"]["share"] / max(jobs["a"]["share"], 1e-9))
            pace(0.3)
        ratio = sum(ratios) / len(ratios)
        assert jobs["a"]["weight"] == 1 and jobs["b"]["weight"] == 3
        assert abs(ratio - 3) <= 0.3, f"worker time b:a = {ratio:.2f} (samples {ratios}), want 3 within 10 %"
        # A third job arriving mid-contention, with a slow trainer: served within 2 s, then fed.
        with Trainer(shared.data, "demo", step_s=0.05, prefetch=2) as slow:
            wait_until(lambda: len(slow.waits) >= 20, 20, 0.05, "the slow trainer's batches")
        assert slow.first_batch_s is not None and slow.first_batch_s < 2.0, slow.first_batch_s
        stall = sum(slow.waits) / (sum(slow.waits) + 0.05 * len(slow.waits))
        # FIFO dispatch measured 75 % here; fair queuing 15-30 % (more on a loaded 2-core runner).
        assert stall < 0.45, f"the slow job stalled {stall:.0%} beside two greedy ones"
    print(f"\nfairness: worker time b:a = {ratio:.2f} (want 3); newcomer's first batch {slow.first_batch_s:.2f} s")


def test_a_client_asks_for_less_weight_never_more(shared) -> None:
    with Trainer(shared.data, "b", weight=0.5), Trainer(shared.data, "a", weight=100):
        wait_until(lambda: job_of(shared, "b") and job_of(shared, "a"), 20, 0.1, "both jobs measured")
        jobs = {j["dataset"]: j for j in status(shared)["jobs"] if j["verdict"] is not None}
    assert jobs["b"]["weight"] == 0.5 and jobs["a"]["weight"] == 1.0


def test_metrics_drive_the_scaled_object_like_prometheus(shared) -> None:
    """Scrape /metrics as Prometheus would, evaluate the ScaledObject's query on it and compute the
    replicas the HPA that KEDA makes would ask for: they are the server's desired_replicas."""
    scaled = yaml.safe_load(SCALED_OBJECT.read_text())
    (trigger,) = scaled["spec"]["triggers"]
    query, threshold = trigger["metadata"]["query"], float(trigger["metadata"]["threshold"])
    found = re.fullmatch(r'max\((\w+)\{job="stoker-loader"\}\)', query)
    assert found and found[1] == "stoker_desired_replicas", query
    with Trainer(shared.data, "a", step_s=0.01):
        wait_until(lambda: job_of(shared, "a"), 20, 0.1, "a measured demand")
        # The gauges follow the engine's housekeeping tick: read both until they agree on the tick.
        scraped: dict[str, float] = {}
        fleet: dict[str, Any] = {}

        def agreed() -> bool:
            scraped.update(metrics(shared.http))
            fleet.update(status(shared)["fleet"])
            measured = scraped["stoker_demand_images_per_second"] > 0
            return measured and scraped["stoker_desired_replicas"] == fleet["desired_replicas"]

        wait_until(agreed, 10, 0.1, "/metrics and /status to agree")
    for name in ("stoker_desired_workers", "stoker_demand_images_per_second", "stoker_capacity_images_per_second"):
        assert name in scraped, name
    value = max(v for k, v in scraped.items() if k.split("|")[0] == "stoker_desired_replicas")
    low, high = scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]
    replicas = min(high, max(low, math.ceil(value / threshold)))  # an External AverageValue target
    assert replicas == min(high, max(low, int(value)))
    assert scraped["stoker_demand_images_per_second"] > 0 and scraped["stoker_capacity_images_per_second"] > 0


def test_desired_workers_converges_to_what_per_worker_throughput_implies(cluster) -> None:
    server = cluster.start("--demand-window-s", str(WINDOW_S), workers=2)
    step_s = 0.025
    with Trainer(server.data, step_s=step_s, batch_size=16) as trainer:
        wait_until(lambda: status(server)["fleet"]["capacity_images_per_s"], 20, 0.1, "a measured capacity")
        pace(WINDOW_S + 0.5)  # the start-up wait leaves the window
        samples: list[tuple[dict[str, Any], dict[str, Any]]] = []
        stop = time.monotonic() + 4.0  # the 60 s, shortened (see the module's docstring)
        while time.monotonic() < stop:
            samples.append((trainer.batches.stats(), status(server)["fleet"]))
            pace(0.25)
    # Demand from the client's own figures over the last window; capacity as the server measured it.
    lag = int(WINDOW_S / 0.25)
    seen, expected = [], []
    for (old, _), (new, fleet) in zip(samples, samples[lag:], strict=False):
        computing = (new["elapsed_s"] - old["elapsed_s"]) - (new["wait_s"] - old["wait_s"])
        demand = (new["images"] - old["images"]) / computing
        expected.append(math.ceil(demand * (1 + fleet["headroom"]) / fleet["capacity_images_per_s"]))
        seen.append(fleet["desired_workers"])
    assert all(abs(s - e) <= 1 for s, e in zip(seen, expected, strict=True)), (seen, expected)
    assert max(seen) - min(seen) <= 1, f"desired_workers oscillated: {seen}"
    print(f"\nconvergence: desired_workers {seen} (expected from the client's demand: {expected})")


def test_autoscaling_grows_on_stalls_shrinks_on_slowdown_and_respects_the_interval(cluster) -> None:
    interval = 2.0
    server = cluster.start(
        "--autoscale-workers", "1:4", "--autoscale-interval-s", str(interval), "--demand-window-s", "1.5", workers=1
    )
    with BackgroundClient(server.data, epochs=None, **FAST) as greedy:
        wait_until(lambda: status(server)["pool"]["size"] >= 2, 30, 0.1, "the pool to grow")
    epochs_greedy = greedy.result(30)
    with BackgroundClient(server.data, epochs=None, step_s=0.1, batch_size=4, image_size=32) as slow:
        wait_until(lambda: status(server)["pool"]["size"] == 1, 40, 0.1, "the pool to shrink")
    epochs_slow = slow.result(30)
    resizes = status(server)["fleet"]["resizes"]
    grown = [r for r in resizes if r["workers_to"] > r["workers_from"]]
    shrunk = [r for r in resizes if r["workers_to"] < r["workers_from"]]
    assert grown and shrunk, resizes
    gaps = [b["at"] - a["at"] for a, b in zip(resizes, resizes[1:], strict=False)]
    assert all(gap >= interval - 0.05 for gap in gaps), f"resized more often than every {interval} s: {gaps}"
    # No work lost: every finished epoch of either client holds each sample exactly once.
    samples = len(list(DEMO_DATA.rglob("*.jpg")))
    for epochs in (epochs_greedy, epochs_slow):
        assert all(sorted(e) == list(range(samples)) for e in epochs[:-1]), "an epoch lost or repeated samples"
    assert status(server)["pool"]["alive"] >= 1
    print(f"\nautoscaling: {[(r['workers_from'], r['workers_to']) for r in resizes]}, gaps {gaps}")


def test_autoscale_settings_are_checked() -> None:
    from stoker.server.settings import ServerSettings

    with pytest.raises(ValueError, match="MIN:MAX"):
        ServerSettings(autoscale_workers="4:2")
    with pytest.raises(ValueError, match="MIN:MAX"):
        ServerSettings(autoscale_workers="four")
    assert ServerSettings(workers=1, autoscale_workers="1:4").autoscale_bounds == (1, 4)
    assert ServerSettings(workers=1, autoscale_workers="2:64").max_workers >= 64
    assert ServerSettings().autoscale_interval_s == 30.0 and ServerSettings().demand_headroom == 0.15


def test_dataset_weight_is_declared_in_its_table(tmp_path: Path) -> None:
    from stoker.server.settings import ServerSettings

    settings = ServerSettings(datasets={"a": {"path": str(DEMO_DATA), "weight": 3}})
    assert [d.weight for d in settings.dataset_decls()] == [3.0]
    with pytest.raises(ValueError):
        ServerSettings(datasets={"a": {"path": str(DEMO_DATA), "weight": 0}})
