"""Datasets where users keep them, on real servers: a flat folder labelled by file names, JSON Lines
manifests, an operator's listing plugin; each exactly once over two ranks, byte-identical to the same
images in a plain ImageFolder in the same order, resumable; and a server that answers while it lists."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from tests.helpers import DEMO_DATA, ROOT, BackgroundClient, fetch_epoch, http_json, interrupted_epoch, wait_until

pytestmark = pytest.mark.slow

PLUGINS = ROOT / "tests" / "plugins"
OPTIONS = dict(batch_size=5, image_size=32, seed=13, world_size=2)
PHOTOS = sorted(DEMO_DATA.rglob("*.jpg"), key=lambda p: (p.parent.name, p.name))
CLASSES = sorted({p.parent.name for p in PHOTOS})


def both_ranks(endpoint: str, dataset: str, **extra) -> list[list]:
    return [fetch_epoch(endpoint, dataset, rank=rank, **(OPTIONS | extra)) for rank in range(2)]


def same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2])
        for x, y in zip(a, b, strict=True)
    )


def check_against_image_folder(endpoint: str, dataset: str) -> list[list]:
    """Exactly once over two ranks, and the bytes, labels and indices of the demo ImageFolder (served
    by the same server as ``demo``); returns the two ranks' batches."""
    got, want = both_ranks(endpoint, dataset), both_ranks(endpoint, "demo")
    seen = sorted(int(i) for rank in got for _, _, idx in rank for i in idx)
    assert seen == list(range(48)), "every sample once over the two ranks"
    assert all(same_batches(a, b) for a, b in zip(got, want, strict=True)), "the ImageFolder's bytes"
    return got


def test_a_flat_folder_labelled_by_file_names(cluster, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for photo in PHOTOS:  # '<class number>_<name>': sorted by name, the ImageFolder's order
        shutil.copy(photo, flat / f"{CLASSES.index(photo.parent.name)}_{photo.name}")
    (flat / "README.txt").write_text("not an image")
    shutil.copy(PHOTOS[0], flat / "unlabelled.jpg")  # does not match: left out, and said
    config = tmp_path / "flat.toml"
    config.write_text(f"[datasets.flat]\npath = '{flat}'\nlabel_pattern = '^(\\d+)_'\n")
    server = cluster.start("--config", str(config))
    check_against_image_folder(server.data, "flat")
    status = http_json(server.http + "/status")[1]
    assert {d["name"]: d["source"] for d in status["datasets"]} == {"demo": "image_folder", "flat": "flat"}
    assert "1 files do not match label_pattern" in cluster.logs()


def test_json_lines_manifest_with_class_names_and_a_root(cluster, tmp_path: Path) -> None:
    manifest = tmp_path / "train.jsonl"
    lines = [json.dumps({"path": str(p.relative_to(DEMO_DATA)), "label": p.parent.name}) for p in PHOTOS]
    manifest.write_text("\n".join(lines) + "\n")
    config = tmp_path / "manifest.toml"
    config.write_text(f"[datasets.manifest]\npath = '{manifest}'\nroot = '{DEMO_DATA}'\n")
    server = cluster.start("--config", str(config))
    got = check_against_image_folder(server.data, "manifest")
    # Resume mid-epoch: the rest of the epoch, exactly as without the break.
    assert same_batches(interrupted_epoch(server.data, "manifest", stop_after=2, **OPTIONS), got[0])


def test_a_listing_plugin_and_a_server_that_answers_while_it_lists(tmp_path: Path) -> None:
    release = tmp_path / "go"
    config = tmp_path / "plugin.toml"
    config.write_text(
        f"[datasets.demo]\npath = '{DEMO_DATA}'\n"
        "[datasets.custom]\nplugin = 'stoker_test_datasets:list_demo'\n"
        f"kwargs = {{split = 'train', wait_for = '{release}'}}\n"
    )
    log_path = tmp_path / "server.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "stoker.server", "serve", "--config", str(config), "--workers", "1"]
    command += ["--bind", "tcp://127.0.0.1:0", "--http", "127.0.0.1:0", "--log-level", "INFO"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env)
    try:
        found = wait_until(lambda: re.search(r"HTTP listening on (\S+)", log_path.read_text()), what="HTTP address")
        http = found.group(1)
        assert http_json(http + "/healthz") == (200, {"status": "ok"}), "alive while starting"
        code, body = wait_until(
            lambda: (
                (r := http_json(http + "/readyz"))[1].get("reason", "").startswith("listing datasets: custom") and r
            ),
            timeout_s=120,
            what="the engine up, demo listed and the plugin's dataset still being listed",
        )
        assert code == 503 and "custom (loading" in body["reason"]
        status = http_json(http + "/status")[1]
        states = {d["name"]: (d["state"], d["source"]) for d in status["datasets"]}
        assert states == {"demo": ("ready", "image_folder"), "custom": ("loading", "plugin")}
        endpoint = status["endpoints"]["data"]
        with BackgroundClient(endpoint, "custom", rank=0, keep_batches=True, **OPTIONS) as early:
            wait_until(
                lambda: http_json(http + "/status")[1]["errors"].get("NOT_READY"), what="the client told NOT_READY"
            )
            release.write_text("go")
            early.result(120)
        assert http_json(http + "/readyz")[0] == 200
        reference = fetch_epoch(endpoint, "demo", rank=0, **OPTIONS)
        assert same_batches(early.batches[0], reference), "the plugin lists the ImageFolder's samples, in order"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def write_shards(folder: Path, per_shard: int = 10, extra: bool = False) -> str:
    """The demo photos as WebDataset shards (ImageFolder order, ``<key>.jpg`` + ``<key>.cls``);
    returns the brace pattern naming them. ``extra`` adds a key without a label and one without an
    image to the last shard, and a member whose name climbs out of the shard's folder."""
    folder.mkdir(parents=True, exist_ok=True)
    count = (len(PHOTOS) + per_shard - 1) // per_shard
    for shard in range(count):
        with tarfile.open(folder / f"train-{shard:04d}.tar", "w") as archive:
            for index in range(shard * per_shard, min(len(PHOTOS), (shard + 1) * per_shard)):
                photo = PHOTOS[index]
                archive.add(photo, arcname=f"{index:06d}.jpg")
                label = str(CLASSES.index(photo.parent.name)).encode()
                member = tarfile.TarInfo(f"{index:06d}.cls")
                member.size = len(label)
                archive.addfile(member, io.BytesIO(label))
            if extra and shard == count - 1:
                archive.add(PHOTOS[0], arcname="orphan.jpg")
                label = tarfile.TarInfo("nolabel-image.cls")
                label.size = 1
                archive.addfile(label, io.BytesIO(b"3"))
                archive.add(PHOTOS[1], arcname="../escape.jpg")
    return str(folder / f"train-{{0000..{count - 1:04d}}}.tar")


def test_local_tar_shards_read_by_offset(cluster, tmp_path: Path) -> None:
    pattern = write_shards(tmp_path / "shards", extra=True)
    config = tmp_path / "shards.toml"
    config.write_text(f"[datasets.shards]\npath = '{pattern}'\n")
    server = cluster.start("--config", str(config))
    got = check_against_image_folder(server.data, "shards")
    logs = cluster.logs()
    assert "3 problems in" in logs and "no orphan.cls member" in logs and "'..' component" in logs, logs[-2000:]
    resumed = interrupted_epoch(server.data, "shards", stop_after=3, **OPTIONS)
    assert same_batches(resumed, got[0]), "resumed mid-epoch"
    status = {d["name"]: d for d in http_json(server.http + "/status")[1]["datasets"]}
    assert status["shards"]["source"] == "shards" and status["shards"]["samples"] == 48
    # A second server on the same shards reads the index from the cache, and agrees on the fingerprint.
    again = cluster.start("--config", str(config), env={"STOKER_INDEX_DIR": str(tmp_path / "shared-index")})
    third = cluster.start("--config", str(config), env={"STOKER_INDEX_DIR": str(tmp_path / "shared-index")})
    views = [{d["name"]: d for d in http_json(s.http + "/status")[1]["datasets"]}["shards"] for s in (again, third)]
    assert [v["from_cache"] for v in views] == [False, True]
    assert views[0]["fingerprint"] == views[1]["fingerprint"] == status["shards"]["fingerprint"]
