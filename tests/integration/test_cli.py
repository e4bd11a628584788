"""The command line: the README's demo, serve's lifecycle, and refusals with clear messages."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import DEMO_DATA, http_json, run_cli

pytestmark = pytest.mark.slow


def test_demo_streams_two_epochs_and_reports_throughput() -> None:
    result = run_cli("demo", "--workers", "2", timeout_s=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    numbers = r"\s+(\d+)\s+([\d.]+)\s+\((\d+) - (\d+)\)\s+([\d.]+)"
    row = re.search(r"^stoker" + numbers + r"\s+(\d+)%", out, re.M)
    assert row, out
    images, rate, low, high, mb_per_s, stall = (float(value) for value in row.groups())
    assert images == 96  # 48 photos x 2 epochs, per timed run
    assert 0 < low <= round(rate) <= high and mb_per_s > 0 and 0 <= stall <= 100
    baseline = re.search(r"^torch DataLoader \(seed recipe\)" + numbers, out, re.M)
    assert baseline and int(baseline.group(1)) == 96, out
    assert "median of 3 runs of 2 epochs each" in out
    assert "stoker / DataLoader:" in out


def test_sigterm_drains_and_exits_within_bounds(cluster) -> None:
    server = cluster.start()
    assert http_json(server.http + "/readyz")[0] == 200
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == 0
    assert time.monotonic() - started < 15
    assert "engine stopped" in cluster.logs()


def test_serve_refuses_bad_configuration_with_exit_code_2(tmp_path: Path) -> None:
    result = run_cli("serve", "--bind", "tcp://127.0.0.1:0", "--http", "127.0.0.1:0", timeout_s=60)
    assert result.returncode == 2 and "no dataset declared" in result.stderr
    result = run_cli("serve", "--dataset", f"x={tmp_path / 'missing'}", "--http", "127.0.0.1:0", timeout_s=60)
    assert result.returncode == 2 and "not a directory" in result.stderr
    config = tmp_path / "bad.toml"
    config.write_text("workers = -1\n")
    result = run_cli("serve", "--config", str(config), "--dataset", f"demo={DEMO_DATA}", timeout_s=60)
    assert result.returncode == 2 and "workers" in result.stderr
    result = run_cli("serve", "--dataset", "noequals", timeout_s=60)
    assert result.returncode == 2 and "NAME=PATH" in result.stderr


def test_client_import_pulls_in_no_server_dependencies() -> None:
    code = (
        "import sys, stoker.client; from stoker.client import RemoteBatches; "
        "bad = [m for m in ('fastapi', 'uvicorn', 'PIL', 'simplejpeg', 'stoker.server') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_demo_refuses_an_empty_measurement() -> None:
    result = run_cli("demo", "--repeats", "0", timeout_s=60)
    assert result.returncode == 2 and "--repeats must be at least 1" in result.stderr
