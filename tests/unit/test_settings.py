"""Configuration: engine config and server settings refuse bad values, naming the field."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from stoker.server.imaging.pipelines import BUILTIN_PIPELINES, pipeline_from_ops
from stoker.server.settings import EngineSettings, ServerSettings, load_settings, parse_http


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"workers": 0}, "workers"),
        ({"max_prefetch": 0}, "max_prefetch"),
        ({"on_error": "ignore"}, "on_error"),
        ({"max_shm_mb": 0}, "max_shm_mb"),
        ({"client_timeout_s": 0}, "client_timeout_s"),
        ({"bind": "localhost:5555"}, "bind="),
        ({"workers": 9, "max_workers": 4}, "workers=9 must be <= max_workers=4"),
    ],
)
def test_engine_config_rejects_bad_values(changes: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        EngineSettings(**changes)


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
    assert small.views[0].scale == (0.35, 1.0) and small.views[0].hflip == 0.5
    with pytest.raises(ValueError, match="first op"):
        pipeline_from_ops("x", [{"op": "hflip"}])
    with pytest.raises(ValueError, match="no parameter 'size'"):
        pipeline_from_ops("x", [{"op": "resize", "size": 3}])
    with pytest.raises(ValueError, match="scale="):
        pipeline_from_ops("x", [{"op": "random_resized_crop", "scale": [0.5, 2.0]}])
    assert BUILTIN_PIPELINES["train"].views[0].hflip == 0.5


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

    from stoker.server.settings import usable_cores

    limit = len(os.sched_getaffinity(0))
    quota_file = Path("/sys/fs/cgroup/cpu.max")
    if quota_file.exists() and quota_file.read_text().split()[0] != "max":
        quota, period = quota_file.read_text().split()[:2]
        limit = min(limit, math.ceil(int(quota) / int(period)))
    assert usable_cores() == max(1, limit)
    assert ServerSettings().workers == usable_cores()


# Flags users' scripts and deploy files already pass: they must keep parsing (a public contract).
CONTRACT_FLAGS = (
    "--bind", "--http", "--http-token", "--http-token-file", "--max-shm-mb", "--workers", "--max-workers",
    "--max-prefetch", "--on-error", "--cache-batches", "--client-timeout-s", "--drain-timeout-s",
    "--task-timeout-s", "--heartbeat-ms", "--log-level", "--ready-file",
    "--curve-secret-key", "--authorized-clients", "--allow-unauthenticated", "--http-public-reads",
    "--http-tls-cert", "--http-tls-key", "--cache", "--cache-bytes",
)  # fmt: skip


def sample_text(name: str) -> str:
    """A command-line/environment value for setting ``name``, from its declared type."""
    import typing

    annotation = ServerSettings.model_fields[name].annotation
    if typing.get_origin(annotation) is typing.Literal:
        return str(typing.get_args(annotation)[-1])
    if annotation in (int, int | None):
        return "3"
    if annotation is float:
        return "2.5"
    return {"bind": "tcp://127.0.0.1:0", "http": "127.0.0.1:0"}.get(name, f"/tmp/{name}")


def flag_of(name: str) -> str:
    """The ``stoker serve`` flag of setting ``name``: ``--name-with-dashes`` unless it names its own."""
    extra = ServerSettings.model_fields[name].json_schema_extra
    return str((extra or {}).get("flag") or f"--{name.replace('_', '-')}")  # type: ignore[union-attr]


def test_every_setting_has_a_flag_and_an_environment_variable_from_its_one_declaration() -> None:
    from stoker.server.settings import given_settings
    from stoker.server.settings.sources import from_environment
    from stoker.server.tools.cli import build_parser

    scalars = [name for name in ServerSettings.model_fields if name not in ("datasets", "pipelines", "mixtures")]
    switches = {name for name in scalars if ServerSettings.model_fields[name].annotation is bool}
    lists = {name for name in scalars if typing.get_origin(ServerSettings.model_fields[name].annotation) is list}
    argv = ["serve"]
    for name in scalars:
        argv += [flag_of(name)] if name in switches else [flag_of(name), sample_text(name)]
    given = given_settings(build_parser().parse_args(argv))
    assert set(given) == set(scalars)

    def value(name: str) -> object:
        return True if name in switches else [sample_text(name)] if name in lists else sample_text(name)

    assert {name: str(value) for name, value in given.items()} == {name: str(value(name)) for name in scalars}
    env = {f"STOKER_{name.upper()}": sample_text(name) for name in scalars}
    assert from_environment(env) == {
        name: [sample_text(name)] if name in lists else sample_text(name) for name in scalars
    }
    flags = {flag_of(name) for name in scalars}
    assert set(CONTRACT_FLAGS) <= flags


def test_live_changes_are_validated_copies_and_fixed_fields_stay_fixed() -> None:
    engine = ServerSettings(workers=2, max_workers=4).engine_config()
    changed = engine.with_changes(max_prefetch=3, client_timeout_s=9.0)
    assert (changed.max_prefetch, changed.client_timeout_s, engine.max_prefetch) == (3, 9.0, 16)
    with pytest.raises(ValueError, match="max_prefetch"):
        engine.with_changes(max_prefetch=0)
    with pytest.raises(ValueError, match=r"cannot change \['bind'\] while serving"):
        engine.with_changes(bind="tcp://*:1")
    with pytest.raises(ValueError, match="workers=5 must be <= max_workers=4"):
        engine.with_changes(workers=5)
    assert engine.max_shm_bytes == 2048 * 2**20 and engine.limits.max_file_bytes == 256 * 2**20
