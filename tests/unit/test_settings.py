"""Configuration: engine config and server settings refuse bad values, naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from stoker.server.engine.config import EngineConfig
from stoker.server.imaging.pipelines import BUILTIN_PIPELINES, pipeline_from_ops
from stoker.server.settings import ServerSettings, load_settings, parse_http


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"workers": 0}, "workers="),
        ({"max_prefetch": 0}, "max_prefetch="),
        ({"on_error": "ignore"}, "on_error="),
        ({"max_shm_bytes": 10}, "max_shm_bytes="),
        ({"client_timeout_s": 0}, "client_timeout_s="),
        ({"bind": "localhost:5555"}, "bind="),
    ],
)
def test_engine_config_rejects_bad_values(changes: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        EngineConfig(**changes)


def test_settings_precedence_is_file_then_env_then_cli(tmp_path: Path) -> None:
    config = tmp_path / "stoker.toml"
    config.write_text('workers = 3\nmax_prefetch = 5\non_error = "raise"\n[datasets.a]\npath = "/data/a"\n')
    env = {"STOKER_MAX_PREFETCH": "7", "STOKER_ON_ERROR": "skip"}
    settings = load_settings(config, env=env, overrides={"on_error": "raise", "datasets": {"b": {"path": "/b"}}})
    assert settings.workers == 3  # file
    assert settings.max_prefetch == 7  # env beats file
    assert settings.on_error == "raise"  # CLI beats env
    assert sorted(settings.datasets) == ["a", "b"]
    engine = settings.engine_config()
    assert engine.max_prefetch == 7 and engine.workers == 3


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("workers = 0", "workers"),
        ("wokers = 2", "wokers"),
        ('http = "nowhere"', "HOST:PORT"),
        ('on_error = "maybe"', "on_error"),
        ('[datasets."bad name"]\npath = "/x"', "dataset="),
        ("[pipelines.p]\nops = 3", "ops"),
    ],
)
def test_bad_settings_name_the_field(tmp_path: Path, content: str, needle: str) -> None:
    config = tmp_path / "stoker.toml"
    config.write_text(content + "\n")
    with pytest.raises(ValueError, match=needle):
        load_settings(config, env={})


def test_http_address_parsing() -> None:
    assert parse_http("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_http("[::1]:8080") == ("::1", 8080)
    with pytest.raises(ValueError):
        parse_http("127.0.0.1:99999")


def test_declared_pipelines_are_validated() -> None:
    small = pipeline_from_ops("small", [{"op": "random_resized_crop", "scale": [0.35, 1.0]}, {"op": "hflip"}])
    assert small.scale == (0.35, 1.0) and small.hflip == 0.5
    with pytest.raises(ValueError, match="first op"):
        pipeline_from_ops("x", [{"op": "hflip"}])
    with pytest.raises(ValueError, match="no parameter 'size'"):
        pipeline_from_ops("x", [{"op": "resize", "size": 3}])
    with pytest.raises(ValueError, match="scale="):
        pipeline_from_ops("x", [{"op": "random_resized_crop", "scale": [0.5, 2.0]}])
    assert BUILTIN_PIPELINES["train"].hflip == 0.5


def test_token_can_come_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    settings = load_settings(env={}, overrides={"http_token_file": str(secret)})
    assert settings.http_token is not None and settings.http_token.get_secret_value() == "from-file"
    with pytest.raises(ValueError, match="http_token_file"):
        load_settings(env={}, overrides={"http_token_file": str(tmp_path / "missing")})


def test_default_workers_respect_affinity_and_a_cgroup_cpu_quota() -> None:
    import math
    import os

    from stoker.server.engine.config import usable_cores

    limit = len(os.sched_getaffinity(0))
    quota_file = Path("/sys/fs/cgroup/cpu.max")
    if quota_file.exists() and quota_file.read_text().split()[0] != "max":
        quota, period = quota_file.read_text().split()[:2]
        limit = min(limit, math.ceil(int(quota) / int(period)))
    assert usable_cores() == max(1, limit)
    assert ServerSettings().workers == usable_cores()
