"""What ``stoker bench`` reports: the ratios between rows, the table and the JSON."""

from __future__ import annotations

import json
from typing import Any

from stoker.server.tools.measure import Series

__all__ = ["ratios", "format_table", "dump_json"]


def ratios(rows: dict[str, Series], cores: int) -> dict[str, float | None]:
    """(d)/(a), (d)/(b), (d)/(cores x (c)) and, when polled, the /status polling overhead."""
    d, a, b, c = (
        rows[key].median().images_per_s if key in rows else 0.0
        for key in ("stoker", "dataloader_seed", "dataloader_strong", "decode_1core")
    )
    out: dict[str, float | None] = {
        "stoker_vs_seed": d / a if a else None,
        "stoker_vs_strong": d / b if b else None,
        "stoker_vs_cores_x_decode": d / (cores * c) if c else None,
    }
    if "stoker_cached" in rows:
        e = rows["stoker_cached"].median().images_per_s
        out["cached_vs_stoker"] = e / d if d else None
        out["cached_vs_strong"] = e / b if b else None
    if "stoker_curve" in rows:
        f = rows["stoker_curve"].median().images_per_s
        out["curve_vs_stoker"] = f / d if d else None
    for key, name in (("dataloader_albumentations", "stoker_vs_albumentations"), ("dali", "stoker_vs_dali")):
        if key in rows:
            peer = rows[key].median().images_per_s
            out[name] = d / peer if peer else None
    if "stoker_mixture" in rows:
        g = rows["stoker_mixture"].median().images_per_s
        out["mixture_vs_stoker"] = g / d if d else None
    if "stoker_no_targets" in rows:
        plain = rows["stoker_no_targets"].median().images_per_s
        out["targets_cost_per_sample"] = 1 - d / plain if plain else None
    if "stoker_polled" in rows:
        polled = rows["stoker_polled"].median().images_per_s
        out["status_polling_overhead"] = 1 - polled / d if d else None
    return out


def format_table(result: dict[str, Any]) -> str:
    """The human-readable table."""
    config = result["config"]
    lines = [
        f"stoker bench: {config['files'] or 'dataset'} {'JPEGs in ' if config['files'] else ''}{config['data']}, "
        f"pipeline {config['pipeline']}, "
        f"{config['image_size']}px, batch {config['batch_size']}, {config['workers']} workers, "
        f"{config['seconds']:g} s x {config['repeats']} repeats",
        "",
        f"{'loader':36s} {'images/s':>9s} {'(min - max)':>17s} {'MB/s':>8s} {'CPU-s/1k img':>12s}",
    ]
    for row in result["rows"].values():
        ips = row["images_per_s"]
        spread = f"({ips['min']:.0f} - {ips['max']:.0f})"
        cpu = f"{row['cpu_s_per_1000_images']:.2f}" if row["mb_per_s"] else "1 core"
        mb = f"{row['mb_per_s']:.1f}" if row["mb_per_s"] else "-"
        lines.append(f"{row['label']:36s} {ips['median']:9.1f} {spread:>17s} {mb:>8s} {cpu:>12s}")
    ratios = result["ratios"]
    decode = result["rows"].get("decode_1core")

    def show(value: float | None, suffix: str = "x") -> str:
        return "-" if value is None else f"{value:.2f}{suffix}"

    share = ratios["stoker_vs_cores_x_decode"]
    lines.append("")
    if decode is not None:
        lines += [
            f"(d) / (a) = {show(ratios['stoker_vs_seed'])}    (d) / (b) = {show(ratios['stoker_vs_strong'])}    "
            f"(d) / ({config['cores']} cores x (c)) = {show(None if share is None else 100 * share, '%')}",
            f"(c) is {decode['note']}; all decoders, 1 core: "
            + ", ".join(f"{name} {rate:.0f}/s" for name, rate in result["decoders_1core_images_per_s"].items()),
        ]
    elif ratios.get("targets_cost_per_sample") is not None or "stoker_no_targets" in result["rows"]:
        cost = ratios.get("targets_cost_per_sample")
        lines.append(
            f"(d) / (b) = {show(ratios['stoker_vs_strong'])}    "
            f"targets' cost per sample: {show(None if cost is None else 100 * cost, '%')}"
        )
    else:
        lines.append("(the DataLoader rows need --data to be a local ImageFolder directory)")
    lines.append(
        f"wire path alone (256 x 224 x 224 x 3 uint8 batches over loopback): {result['wire_gb_per_s']:.2f} GB/s"
    )
    if result.get("wire_curve_gb_per_s") is not None:
        plain, curve = result["wire_gb_per_s"], result["wire_curve_gb_per_s"]
        lines.append(
            f"wire path with CURVE: {curve:.2f} GB/s ({100 * (1 - curve / plain):.0f}% less)    "
            f"(f) / (d) = {show(ratios.get('curve_vs_stoker'))}"
        )
    if ratios.get("cached_vs_stoker") is not None:
        lines.append(
            f"(e) / (d) = {show(ratios['cached_vs_stoker'])}    (e) / (b) = {show(ratios.get('cached_vs_strong'))}"
        )
    peers = [f"(d) / {tag} = {show(ratios[name])}" for tag, name in
             (("(g)", "stoker_vs_albumentations"), ("(h)", "stoker_vs_dali")) if name in ratios]  # fmt: skip
    if peers:
        lines.append("    ".join(peers))
    if result.get("stoker_stages_ms"):
        stages = result["stoker_stages_ms"]
        lines.append("(d) stages, mean ms: " + ", ".join(f"{name} {ms:.2f}" for name, ms in sorted(stages.items())))
    if ratios.get("mixture_vs_stoker") is not None:
        lines.append(f"(i) / (d) = {show(ratios['mixture_vs_stoker'])}    (a 3-source mixture against one dataset)")
    if "status_polling_overhead" in ratios and ratios["status_polling_overhead"] is not None:
        lines.append(f"/status polling overhead on (d): {100 * ratios['status_polling_overhead']:.1f}%")
    return "\n".join(lines)


def dump_json(result: dict[str, Any]) -> str:
    """The result as JSON for scripts."""
    return json.dumps(result, indent=2, default=str)
