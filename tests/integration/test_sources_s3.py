"""Datasets on object storage, against a real S3-compatible server (moto, started by the tests on
loopback) with buckets the tests fill from the shipped photos: an ImageFolder prefix, a manifest
object, tar shards; a missing object, a store that goes away, a server restarted while a client
reads, and credentials that never show."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import BackgroundClient, fetch_epoch, http_json, interrupted_epoch, open_client
from tests.integration.test_sources import OPTIONS, PHOTOS, check_against_image_folder, write_shards
from tests.s3 import DelayRelay, make_bucket

pytestmark = pytest.mark.slow
SECRET = "stoker-test-secret-Zq8w"


def server_env(s3_server, endpoint: str | None = None) -> dict[str, str]:
    """The loader's AWS settings: moto's endpoint (or a relay's) and a secret to look for in the output."""
    env = dict(s3_server.env)
    env["AWS_SECRET_ACCESS_KEY"] = SECRET
    if endpoint is not None:
        env["AWS_ENDPOINT_URL"] = endpoint
    return env


def folder_objects(prefix: str) -> dict[str, bytes]:
    return {f"{prefix}{photo.parent.name}/{photo.name}": photo.read_bytes() for photo in PHOTOS}


def config_file(tmp_path: Path, name: str, path: str, extra: str = "") -> Path:
    config = tmp_path / f"{name}.toml"
    config.write_text(f"[datasets.{name}]\npath = '{path}'\n{extra}")
    return config


def test_an_image_folder_under_a_prefix(cluster, s3_server, s3_bucket, tmp_path: Path) -> None:
    make_bucket(s3_server.endpoint, s3_bucket, folder_objects("train/"))
    config = config_file(tmp_path, "remote", f"s3://{s3_bucket}/train/")
    server = cluster.start("--config", str(config), env=server_env(s3_server))
    got = check_against_image_folder(server.data, "remote")
    resumed = interrupted_epoch(server.data, "remote", stop_after=2, **OPTIONS)
    assert len(resumed) == len(got[0])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, got[0], strict=True)), "resumed mid-epoch"
    status = http_json(server.http + "/status")[1]
    assert SECRET not in json.dumps(status) and SECRET not in json.dumps(http_json(server.http + "/config")[1])
    assert SECRET not in cluster.logs()


def test_a_manifest_object_with_a_missing_image(cluster, s3_server, s3_bucket, tmp_path: Path) -> None:
    objects = {f"images/{photo.parent.name}/{photo.name}": photo.read_bytes() for photo in PHOTOS}
    lines = [json.dumps({"path": f"{p.parent.name}/{p.name}", "label": p.parent.name}) for p in PHOTOS]
    lines.append(json.dumps({"path": "fish/not-uploaded.jpg", "label": "fish"}))
    objects["lists/train.jsonl"] = ("\n".join(lines) + "\n").encode()
    make_bucket(s3_server.endpoint, s3_bucket, objects)
    extra = f"root = 's3://{s3_bucket}/images/'\n"
    config = config_file(tmp_path, "listed", f"s3://{s3_bucket}/lists/train.jsonl", extra)
    server = cluster.start("--config", str(config), env=server_env(s3_server))
    ranks = [fetch_epoch(server.data, "listed", rank=rank, **OPTIONS) for rank in range(2)]
    seen = [int(i) for rank in ranks for _, _, idx in rank for i in idx]
    assert 48 not in seen and sorted(set(seen)) == list(range(48)), "the missing object is replaced"
    assert all(len(idx) == 5 for rank in ranks for _, _, idx in rank[:-1]), "batches keep their shape"
    (bad,) = http_json(server.http + "/status")[1]["bad_samples"]["recent"]
    assert bad["path"] == f"s3://{s3_bucket}/images/fish/not-uploaded.jpg" and "no such object" in bad["reason"]


def test_tar_shards_in_a_bucket_and_a_server_restarted_while_reading(cluster, s3_server, s3_bucket, tmp_path) -> None:
    pattern = write_shards(tmp_path / "shards")
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    make_bucket(s3_server.endpoint, s3_bucket, {f"shards/{s.name}": s.read_bytes() for s in shards})
    remote = f"s3://{s3_bucket}/shards/" + pattern.rsplit("/", 1)[1]
    config = config_file(tmp_path, "remote_shards", remote)
    env = server_env(s3_server)
    server = cluster.start("--config", str(config), env=env)
    reference = check_against_image_folder(server.data, "remote_shards")
    with BackgroundClient(server.data, "remote_shards", rank=0, pause_at={2}, keep_batches=True, **OPTIONS) as client:
        client.wait_paused()
        cluster.kill(server)
        replacement = cluster.restart(server)  # same address, same bucket: cold start, cached index
        assert replacement.data == server.data
        client.release()
        client.result()
    assert [int(i) for _, _, idx in client.batches[0] for i in idx] == [
        int(i) for _, _, idx in reference[0] for i in idx
    ], "exactly the same epoch, nothing lost or repeated"
    views = {d["name"]: d for d in http_json(replacement.http + "/status")[1]["datasets"]}
    assert views["remote_shards"]["from_cache"] and views["remote_shards"]["source"] == "shards"


def test_a_store_that_goes_away_fails_the_batch_clearly_not_a_hang(cluster, s3_server, s3_bucket, tmp_path) -> None:
    make_bucket(s3_server.endpoint, s3_bucket, folder_objects("train/"))
    relay = DelayRelay.to(s3_server.endpoint, delay_s=0.0)
    try:
        config = config_file(tmp_path, "remote", f"s3://{s3_bucket}/train/")
        server = cluster.start("--config", str(config), env=server_env(s3_server, relay.endpoint))
        fetch_epoch(server.data, "remote", rank=0, **OPTIONS)  # reads work through the relay
    finally:
        relay.close()  # the store is gone: nothing listens at the address the server reads from
    from stoker.client import ServerError

    with open_client(server.data, "remote", rank=0, **(OPTIONS | {"seed": 99, "timeout_s": 120})) as batches:
        with pytest.raises(ServerError, match="storage cannot be reached") as info:
            list(batches)
    assert "STORAGE_UNAVAILABLE" in "\n".join(info.value.__notes__)
    status = http_json(server.http + "/status")[1]
    assert status["errors"]["STORAGE_UNAVAILABLE"] >= 4 and status["bad_samples"]["count"] == 0
    assert SECRET not in cluster.logs()


def test_a_dataset_that_cannot_be_listed_stops_the_server_with_the_reason(s3_server, tmp_path) -> None:
    from tests.helpers import run_cli

    result = run_cli(
        "serve", "--dataset", "gone=s3://no-such-bucket-for-stoker/train/", "--http", "127.0.0.1:0",
        "--bind", "tcp://127.0.0.1:0", "--workers", "1", timeout_s=180, env=server_env(s3_server),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "dataset 'gone'" in result.stderr and "no-such-bucket-for-stoker" in result.stderr
    assert SECRET not in result.stderr


def test_image_text_shards_in_a_bucket_every_caption_with_its_image(cluster, s3_server, s3_bucket, tmp_path) -> None:
    from tests.targets_data import caption_shards, key_of_colour

    pattern = caption_shards(tmp_path / "pairs")
    shards = sorted((tmp_path / "pairs").glob("*.tar"))
    make_bucket(s3_server.endpoint, s3_bucket, {f"pairs/{s.name}": s.read_bytes() for s in shards})
    remote = f"s3://{s3_bucket}/pairs/" + pattern.rsplit("/", 1)[1]
    config = config_file(tmp_path, "pairs", remote, "targets = {caption = 'txt', meta = 'json'}\n")
    server = cluster.start("--config", str(config), env=server_env(s3_server))
    keys = []
    for rank in range(2):
        options = dict(batch_size=4, image_size=32, pipeline="resize", targets="all", rank=rank, world_size=2)
        for images, targets, _ in fetch_epoch(server.data, "pairs", **options):
            for row, caption in enumerate(targets["caption"]):
                key = int(caption.rsplit(" ", 1)[1])
                assert targets["meta"][row]["key"] == key
                assert key_of_colour(images[row][0].float().mean().item()) == key, "the caption is its image's"
                keys.append(key)
    assert sorted(keys) == list(range(12)), "exactly once over 2 ranks"
