"""``stoker status [URL]``: a terminal summary of a server's ``/status`` (standard library only)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

__all__ = ["fetch_status", "format_status"]


def fetch_status(url: str, timeout_s: float = 10.0, token: str | None = None) -> dict[str, Any]:
    """GET ``URL/status`` (with the bearer ``token``); raise ``OSError`` with a readable message when it fails."""
    base = url if "://" in url else f"http://{url}"
    request = urllib.request.Request(base.rstrip("/") + "/status")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise OSError(f"{base}/status answered {exc.code}: {exc.read().decode(errors='replace')[:200]}") from None
    except (urllib.error.URLError, TimeoutError) as exc:
        raise OSError(f"cannot reach {base}: {getattr(exc, 'reason', exc)}") from None


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [headers] + [[str(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths, strict=False)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return lines


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_status(status: dict[str, Any]) -> str:
    """The readable summary."""
    pool, throughput = status["pool"], status["throughput"]
    lines = [
        f"stoker {status['version']}  {'ready' if status['ready'] else 'NOT READY'}  up {status['uptime_s']:.0f} s",
        f"data {status['endpoints']['data']}   http {status['endpoints']['http']}",
        f"workers {pool['alive']}/{pool['size']} alive, {pool['busy']} busy, {pool['restarts']} restarts",
        f"throughput {throughput['images_per_s']:.1f} images/s, {throughput['mb_per_s']:.1f} MB/s; "
        f"clients' data stall {_pct(status['stall_share'])}; {status['inflight_batches']} batches in flight",
        "",
    ]
    lines += _fleet(status)
    lines += _clients(status["clients"])
    lines.append("")
    stages = dict(status["stages"], latency=status["latency"])
    lines += _table(
        ["stage", "mean ms", "p95 ms", "n"],
        [[name, f"{s['mean_ms']:.2f}", f"{s['p95_ms']:.2f}", s["count"]] for name, s in stages.items()],
    )
    errors = status["errors"]
    bad = status["bad_samples"]
    lines += [
        "",
        "errors: " + (", ".join(f"{code} {n}" for code, n in errors.items()) or "none"),
        f"bad samples: {bad['count']}",
    ]
    lines += [f"  {b['path']}: {b['reason']}" for b in bad["recent"][:10]]
    return "\n".join(lines)


def _fleet(status: dict[str, Any]) -> list[str]:
    """Demand, the desired sizes and one verdict line per job (servers before 0.x lack them)."""
    fleet = status.get("fleet")
    lines = []
    if fleet:
        capacity = fleet["capacity_images_per_s"]
        lines.append(
            f"demand {fleet['demand_images_per_s']:.0f} images/s; one worker renders "
            + ("-" if capacity is None else f"{capacity:.0f}")
            + f" images/s; desired {fleet['desired_workers'] or '-'} workers, "
            f"{fleet['desired_replicas'] or '-'} replicas"
            + (f" (autoscaling {fleet['autoscale']})" if fleet["autoscale"] else "")
        )
    for job in status.get("jobs", []):
        if job.get("verdict"):
            lines.append(
                f"job {job['job_id'][:8]} ({job['dataset']}, weight {job['weight']:g}, "
                f"{_pct(job['share'])} of worker time): {job['verdict']}: {job['advice']}"
            )
    return [*lines, ""] if lines else []


def _clients(clients: list[dict[str, Any]]) -> list[str]:
    if not clients:
        return ["no clients connected"]
    return _table(
        ["client", "rank", "epoch", "batches", "images/s", "MB/s", "stall", "in flight", "seen"],
        [
            [
                c["client_id"][:8],
                f"{c['rank']}/{c['world_size']}",
                c["epoch"],
                c["batches"],
                f"{c['images_per_s']:.1f}",
                f"{c['mb_per_s']:.1f}",
                _pct(c["stall_share"]),
                c["inflight"],
                f"{c['last_seen_s']:.0f}s ago",
            ]
            for c in clients
        ],
    )
