"""``stoker bench`` runs and reports every row (a smoke test: seconds, never a speed assertion)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import DEMO_DATA, run_cli

pytestmark = pytest.mark.slow


def test_bench_runs_every_row_and_reports_json() -> None:
    result = run_cli(
        "bench",
        "--data",
        str(DEMO_DATA),
        "--seconds",
        "0.5",
        "--repeats",
        "1",
        "--workers",
        "2",
        "--batch-size",
        "16",
        "--poll-status-ms",
        "100",
        "--json",
        timeout_s=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    rows = report["rows"]
    assert set(rows) == {"dataloader_seed", "dataloader_strong", "decode_1core", "stoker", "stoker_polled"}
    for key, row in rows.items():
        assert row["images_per_s"]["median"] > 0, key
        assert len(row["runs"]) == 1
    for key in ("dataloader_seed", "dataloader_strong", "stoker"):
        assert rows[key]["mb_per_s"] > 0 and rows[key]["cpu_s_per_1000_images"] > 0
    assert set(report["ratios"]) >= {
        "stoker_vs_seed",
        "stoker_vs_strong",
        "stoker_vs_cores_x_decode",
        "status_polling_overhead",
    }
    assert report["wire_gb_per_s"] > 0
    assert len(report["decoders_1core_images_per_s"]) == 3


def test_bench_table_output() -> None:
    result = run_cli(
        "bench",
        "--data",
        str(DEMO_DATA),
        "--seconds",
        "0.3",
        "--repeats",
        "1",
        "--workers",
        "1",
        "--batch-size",
        "8",
        "--curve",
        timeout_s=300,
    )
    assert result.returncode == 0, result.stderr
    for needle in (
        "(f) stoker, CURVE on",
        "wire path with CURVE",
        "(f) / (d) =",
        "(a) DataLoader seed recipe",
        "(b) DataLoader, stoker's work",
        "(c) decode, 1 core",
        "(d) stoker end to end",
        "(d) / (a) =",
        "wire path alone",
        "GB/s",
    ):
        assert needle in result.stdout, needle
    assert run_cli("bench", "--data", "/nonexistent", timeout_s=60).returncode == 2
