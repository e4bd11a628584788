"""``stoker bench`` runs and reports every row (a smoke test: seconds, never a speed assertion)."""

from __future__ import annotations

import json

import pytest

from stoker.server.tools.bench import format_table
from tests.helpers import DEMO_DATA, run_cli

pytestmark = pytest.mark.slow


def test_bench_runs_every_row_and_reports_json_and_a_table() -> None:
    # One run for both outputs: a bench starts several servers, and the table is drawn from this JSON.
    result = run_cli(
        "bench", "--data", str(DEMO_DATA), "--seconds", "0.4", "--repeats", "1", "--workers", "2",
        "--batch-size", "16", "--poll-status-ms", "100", "--curve", "--json",
        timeout_s=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    rows = report["rows"]
    assert set(rows) == {
        "dataloader_seed",
        "dataloader_strong",
        "decode_1core",
        "stoker",
        "stoker_curve",
        "stoker_polled",
    }
    for key, row in rows.items():
        assert row["images_per_s"]["median"] > 0, key
        assert len(row["runs"]) == 1
    for key in ("dataloader_seed", "dataloader_strong", "stoker", "stoker_curve"):
        assert rows[key]["mb_per_s"] > 0 and rows[key]["cpu_s_per_1000_images"] > 0
    assert set(report["ratios"]) >= {
        "stoker_vs_seed",
        "stoker_vs_strong",
        "stoker_vs_cores_x_decode",
        "status_polling_overhead",
        "curve_vs_stoker",
    }
    assert report["wire_gb_per_s"] > 0 and report["wire_curve_gb_per_s"] > 0
    assert len(report["decoders_1core_images_per_s"]) == 3
    table = format_table(report)
    for needle in (
        "(a) DataLoader seed recipe",
        "(b) DataLoader, stoker's work",
        "(c) decode, 1 core",
        "(d) stoker end to end",
        "(f) stoker, CURVE on",
        "(d) / (a) =",
        "wire path alone",
        "wire path with CURVE",
        "(f) / (d) =",
        "GB/s",
    ):
        assert needle in table, needle


def test_bench_refuses_data_it_cannot_read() -> None:
    assert run_cli("bench", "--data", "/nonexistent", timeout_s=60).returncode == 2
