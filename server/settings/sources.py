"""Where settings come from, in increasing precedence: a TOML file, the environment
(``STOKER_<FIELD>``, JSON for the ``datasets`` and ``pipelines`` tables, comma-separated names for
``cache``), the command line."""

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
_TABLES = ("datasets", "pipelines", "mixtures")
_LISTS = ("cache",)
"""Settings holding a list: comma-separated in the environment (``STOKER_CACHE=a,b``)."""


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
        elif name in _LISTS:
            out[name] = [item.strip() for item in raw.split(",") if item.strip()]
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
    for source in (from_environment(os.environ if env is None else env), overrides or {}):
        for key, value in source.items():
            if key == "datasets":
                merged["datasets"] = {**merged.get("datasets", {}), **value}
            elif value is not None:
                merged[key] = value
    return ServerSettings.model_validate(merged)
