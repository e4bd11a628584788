"""Where settings come from, in increasing precedence: a TOML file, the environment
(``STOKER_<FIELD>``, JSON for the ``datasets`` and ``pipelines`` tables), the command line."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stoker.server.settings.model import ServerSettings

__all__ = ["load_settings", "from_environment", "ENV_PREFIX"]

ENV_PREFIX = "STOKER_"
_TABLES = ("datasets", "pipelines")


def from_environment(env: Mapping[str, str]) -> dict[str, Any]:
    """The settings ``env`` names, as raw values for validation."""
    out: dict[str, Any] = {}
    for name in ServerSettings.model_fields:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        if name in _TABLES:
            try:
                out[name] = json.loads(raw)
            except ValueError as exc:
                raise ValueError(f"{ENV_PREFIX}{name.upper()} must be a JSON object: {exc}") from None
        else:
            out[name] = raw
    return out


def load_settings(
    config_file: Path | None = None, env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> ServerSettings:
    """Merge file < environment < command line and validate; raises ``ValueError`` (or ``OSError``
    for an unreadable file) naming what is wrong. Declared datasets from every source add up."""
    merged: dict[str, Any] = {}
    if config_file is not None:
        with open(config_file, "rb") as handle:
            merged.update(tomllib.load(handle))
    overrides = dict(overrides or {})
    cached = overrides.pop("cache_datasets", None) or []
    for source in (from_environment(os.environ if env is None else env), overrides):
        for key, value in source.items():
            if key == "datasets":
                merged["datasets"] = {**merged.get("datasets", {}), **value}
            elif value is not None:
                merged[key] = value
    for name in cached:  # --cache NAME: a declared dataset, from any source, marked cached
        declared = merged.get("datasets", {})
        if name not in declared:
            raise ValueError(f"--cache {name}: no dataset {name!r} is declared; declared: {sorted(declared)}")
        declared[name] = {**declared[name], "cache": True}
    return ServerSettings.model_validate(merged)
