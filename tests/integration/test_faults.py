"""Faults on real processes: dying workers, a worker-killing sample, killed and restarted servers,
killed and resumed clients. Each epoch must still deliver every sample exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from stoker.client.protocol.job import JobSpec
from tests.helpers import CLIENT_OPTIONS, DEMO_DATA, BackgroundClient, http_json, wait_until

pytestmark = pytest.mark.slow

SEED = 3


def assert_exactly_once(epochs: list[list[int]], samples: int = 48) -> None:
    for epoch in epochs:
        assert sorted(epoch) == list(range(samples)), "an epoch lost or repeated a sample"


def test_a_killed_worker_is_replaced_and_its_batch_redone(cluster) -> None:
    server = cluster.start()

    def busy_worker():
        pool = http_json(server.http + "/status")[1]["pool"]
        return next((w for w in pool["workers"] if w["current"]), None)

    with BackgroundClient(server.data, epochs=3, image_size=160, seed=SEED) as client:
        victim = wait_until(busy_worker, what="a worker in the middle of a sample")
        os.kill(victim["pid"], signal.SIGKILL)
        assert_exactly_once(client.result())
    pool = wait_until(
        lambda: (p := http_json(server.http + "/status")[1]["pool"])["alive"] == 2 and p,
        what="the pool back at 2 workers",
    )
    assert pool["restarts"] >= 1 and victim["pid"] not in [w["pid"] for w in pool["workers"]]
    assert "died with exit code -9" in cluster.logs()


def test_a_sample_that_kills_workers_is_quarantined(cluster, tmp_path: Path) -> None:
    root = tmp_path / "poisoned"
    for photo in sorted(DEMO_DATA.rglob("*.jpg"))[:23]:
        (root / "a").mkdir(parents=True, exist_ok=True)
        (root / "a" / photo.name).write_bytes(photo.read_bytes())
    # A slow-to-decode file stands for one that crashes its decoder: whoever decodes it gets SIGKILL.
    gradient = np.linspace(0, 255, 4000 * 4000 * 3, dtype=np.float32).astype(np.uint8).reshape(4000, 4000, 3)
    poison = root / "a" / "poison.png"
    Image.fromarray(gradient).save(poison, compress_level=1)
    server = cluster.start(datasets={"poisoned": root})
    kills: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set():
            for worker in http_json(server.http + "/status")[1]["pool"]["workers"]:
                if worker["current"] == str(poison) and worker["pid"] not in kills:
                    os.kill(worker["pid"], signal.SIGKILL)
                    kills.append(worker["pid"])
            stop.wait(0.01)

    watcher = threading.Thread(target=killer, daemon=True)
    watcher.start()
    try:
        with BackgroundClient(server.data, "poisoned", epochs=2, batch_size=6, seed=SEED) as client:
            epochs = client.result()
    finally:
        stop.set()
        watcher.join(30)
    status = http_json(server.http + "/status")[1]
    assert len(kills) == 2, "decoded again after killing two workers"
    (bad,) = status["bad_samples"]["recent"]
    assert bad["path"] == str(poison) and "quarantined: killed 2 workers" in bad["reason"]
    paths = [path for path, _ in ImageFolder(str(root)).samples]
    poison_index = paths.index(str(poison))
    for epoch in epochs:
        assert len(epoch) == 24 and poison_index not in epoch, "batches keep their shape, without the poison"
        assert set(epoch) == set(range(24)) - {poison_index}, "every other sample delivered"
    assert status["pool"]["restarts"] == 2


def test_a_worker_stuck_on_a_task_is_killed_and_the_sample_quarantined(cluster, tmp_path: Path) -> None:
    root = tmp_path / "slow"
    (root / "a").mkdir(parents=True)
    for photo in sorted(DEMO_DATA.rglob("*.jpg"))[:11]:
        (root / "a" / photo.name).write_bytes(photo.read_bytes())
    # Decoding this takes well over the 0.25 s task timeout: the watchdog treats it as a hang.
    noise = np.random.default_rng(0).integers(0, 255, (5000, 5000, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "a" / "zz_slow.png", compress_level=1)
    server = cluster.start("--task-timeout-s", "0.25", datasets={"slow": root})
    with BackgroundClient(server.data, "slow", epochs=1, batch_size=4, timeout_s=120, seed=SEED) as client:
        (epoch,) = client.result()
    assert sorted(epoch) != list(range(12)) and len(epoch) == 12 and 11 not in epoch
    status = http_json(server.http + "/status")[1]
    (bad,) = status["bad_samples"]["recent"]
    assert bad["path"].endswith("zz_slow.png") and "quarantined" in bad["reason"]
    assert "stuck on a task" in cluster.logs()


def test_server_killed_and_restarted_on_the_same_address_loses_nothing(cluster) -> None:
    server = cluster.start()
    with BackgroundClient(server.data, epochs=2, pause_at={5}, seed=SEED) as client:
        assert client.wait_paused() == 5
        cluster.kill(server)  # SIGKILL: no drain, requests in flight are lost
        replacement = cluster.restart(server)
        assert replacement.data == server.data
        client.release()
        assert_exactly_once(client.result())


def test_sigterm_drains_then_a_restart_continues_the_epoch(cluster) -> None:
    server = cluster.start("--drain-timeout-s", "3")
    with BackgroundClient(server.data, epochs=1, pause_at={4}, seed=SEED) as client:
        assert client.wait_paused() == 4
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(20) == 0
        replacement = cluster.restart(server)
        client.release()
        assert_exactly_once(client.result())
    assert http_json(replacement.http + "/readyz")[0] == 200


# A trainer of its own (a process that can be killed): the tests' client options come as JSON.
CLIENT_SCRIPT = """
import json, sys
from stoker.client import RemoteBatches
endpoint, options, state_file = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
with RemoteBatches(endpoint, "demo", **options) as batches:
    try:
        with open(state_file) as handle:
            batches.load_state_dict(json.load(handle))
    except FileNotFoundError:
        pass
    for _, _, idx in batches:
        # Checkpoint after every batch, as a trainer would with its model.
        with open(state_file + ".tmp", "w") as handle:
            json.dump(batches.state_dict(), handle)
        import os
        os.replace(state_file + ".tmp", state_file)
        print(json.dumps(idx.tolist()), flush=True)
        if len(sys.argv) > 4:
            sys.stdin.readline()  # wait to be told to go on (or to be killed)
"""


def test_a_killed_client_resumes_from_its_checkpoint_and_the_server_forgets_it(cluster, tmp_path: Path) -> None:
    server = cluster.start("--client-timeout-s", "1")
    state = str(tmp_path / "state.json")
    options = json.dumps(CLIENT_OPTIONS | {"seed": 8})
    command = [sys.executable, "-c", CLIENT_SCRIPT, server.data, options, state]
    first = subprocess.Popen(command + ["step"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    seen: list[int] = []
    for _ in range(5):
        seen += json.loads(first.stdout.readline())
        first.stdin.write("\n")
        first.stdin.flush()
    seen += json.loads(first.stdout.readline())  # batch 6 is checkpointed, then the client dies
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    first.stdout.close()
    first.stdin.close()
    # The server frees what the dead client had in flight once it times out.
    wait_until(lambda: not http_json(server.http + "/status")[1]["clients"], what="the dead client forgotten")
    status = http_json(server.http + "/status")[1]
    assert status["inflight_batches"] == 0
    second = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    rest = [i for line in second.stdout.splitlines() for i in json.loads(line)]
    assert sorted(seen + rest) == list(range(48))


def test_a_slow_client_holds_no_more_than_its_window(cluster) -> None:
    server = cluster.start()
    with BackgroundClient(server.data, epochs=1, pause_at={1}, prefetch=2, seed=1) as slow:
        assert slow.wait_paused() == 1  # the slow client stops reading entirely
        with BackgroundClient(server.data, epochs=3, seed=2) as fast:
            assert_exactly_once(fast.result())
        clients = http_json(server.http + "/status")[1]["clients"]
        slow_job = JobSpec(
            "demo", "train", CLIENT_OPTIONS["image_size"], CLIENT_OPTIONS["batch_size"], seed=1, layout="nchw"
        )  # a contiguous client asks for NCHW rows
        (slow_view,) = [c for c in clients if c["job_id"] == slow_job.job_id]
        # One batch taken and at most its window of two more sent ahead; nothing else held for it.
        assert slow_view["batches"] <= 3 and slow_view["inflight"] <= 2, clients
        slow.release()
        assert_exactly_once(slow.result())
