"""Liveness that tells the truth, through real ``stoker serve`` processes: an engine that dies makes
/healthz fail and the process exit non-zero; workers that cannot start are respawned with capped
backoff, make the server not ready with the reason, and recovery is automatic; an operator's plugin
that fails shows its own traceback."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import DEMO_DATA, ROOT, fetch_epoch, http_json, run_cli, wait_until

pytestmark = pytest.mark.slow

PLUGINS = ROOT / "tests" / "plugins"


def test_an_engine_that_dies_fails_liveness_and_the_process_exits_non_zero(cluster, tmp_path: Path) -> None:
    trigger = tmp_path / "crash-now"
    server = cluster.start("--drain-timeout-s", "4", env={"STOKER_FAILPOINTS": f"engine.loop@{trigger}"})
    assert http_json(server.http + "/healthz") == (200, {"status": "ok"})
    assert len(fetch_epoch(server.data)) == 12, "serving before the fault"
    trigger.touch()
    code, body = wait_until(
        lambda: (reply := http_json(server.http + "/healthz"))[0] == 503 and reply,
        timeout_s=10,
        interval_s=0.05,
        what="/healthz reporting the dead engine",
    )
    assert body["status"] == "dead" and "engine loop crashed: InjectedFault" in body["reason"]
    ready = http_json(server.http + "/readyz")
    assert ready[0] == 503 and "engine loop crashed" in ready[1]["reason"]
    assert server.process.wait(timeout=30) == 1, "exits non-zero, so a supervisor restarts it"
    logs = cluster.logs()
    assert "engine loop crashed" in logs and "Traceback" in logs and "InjectedFault" in logs
    assert "the engine died" in logs and "exiting in 4.0 s" in logs


def test_workers_that_cannot_start_back_off_make_the_server_unready_and_recover(cluster, tmp_path: Path) -> None:
    trigger = tmp_path / "workers-fail"
    server = cluster.start(
        "--worker-restart-backoff-s", "0.2", "--worker-restart-backoff-max-s", "0.8",
        workers=1, env={"STOKER_FAILPOINTS": f"worker.start@{trigger}"},
    )  # fmt: skip
    (worker,) = http_json(server.http + "/status")[1]["pool"]["workers"]
    trigger.touch()
    os.kill(worker["pid"], signal.SIGKILL)
    code, body = wait_until(
        lambda: (reply := http_json(server.http + "/readyz"))[0] == 503 and reply,
        timeout_s=60,
        what="readiness naming the workers that cannot start",
    )
    assert "workers cannot start" in body["reason"] and "InjectedFault" in body["reason"]
    assert http_json(server.http + "/healthz")[0] == 200, "the process itself can still serve: no restart"
    pool = http_json(server.http + "/status")[1]["pool"]
    assert pool["start_failures"] >= 3 and "workers cannot start" in pool["problem"]
    wait_until(lambda: cluster.logs().count("failed to start (") >= 5, timeout_s=30, what="five failed starts")
    delays = [
        float(d) for d in re.findall(r"failed to start \(\d+ in a row\): .*; next try in ([\d.]+) s", cluster.logs())
    ]
    assert delays[:5] == [0.2, 0.4, 0.8, 0.8, 0.8], "doubling from the first wait, capped"
    trigger.unlink()
    wait_until(lambda: http_json(server.http + "/readyz")[0] == 200, timeout_s=60, what="recovery without a restart")
    pool = http_json(server.http + "/status")[1]["pool"]
    assert pool["start_failures"] == 0 and pool["problem"] is None and pool["alive"] == 1
    assert len(fetch_epoch(server.data)) == 12
    assert "started after" in cluster.logs() and "recovered" in cluster.logs()


def test_a_pipeline_plugin_that_fails_to_build_shows_its_own_traceback(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    config.write_text(
        f"[datasets.demo]\npath = '{DEMO_DATA}'\n"
        "[pipelines.broken]\n"
        'ops = [{op = "random_resized_crop"}, {op = "plugin", call = "stoker_test_plugins:NeedsAModel"}]\n'
    )
    result = run_cli("serve", "--config", str(config), "--bind", "tcp://127.0.0.1:0", "--http", "127.0.0.1:0",
                     timeout_s=120, env={"PYTHONPATH": str(PLUGINS)})  # fmt: skip
    assert result.returncode == 2
    assert "pipeline 'broken'" in result.stderr and "no weights at 'model.pt'" in result.stderr
    # The operator sees where in their own code it failed: file, function and line.
    assert "raised by:" in result.stderr and "stoker_test_plugins.py" in result.stderr
    assert "_load_weights" in result.stderr and "FileNotFoundError" in result.stderr


def test_a_listing_plugin_that_fails_shows_its_own_traceback(tmp_path: Path) -> None:
    config = tmp_path / "broken-listing.toml"
    config.write_text(
        f"[datasets.demo]\npath = '{DEMO_DATA}'\n"
        "[datasets.custom]\nplugin = 'stoker_test_datasets:list_from_a_broken_index'\n"
    )
    command = [sys.executable, "-m", "stoker.server", "serve", "--config", str(config), "--workers", "1"]
    command += ["--bind", "tcp://127.0.0.1:0", "--http", "127.0.0.1:0"]
    env = {**os.environ, "PYTHONPATH": str(PLUGINS)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 2 and "cannot open the operator's index 'index.db'" in result.stderr
    assert "stoker_test_datasets.py" in result.stderr and "_read_index" in result.stderr
