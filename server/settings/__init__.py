"""The server's settings: one model, read from TOML, the environment and the command line."""

from stoker.server.settings.model import (
    DatasetSettings,
    LogLevel,
    PipelineSettings,
    ServerSettings,
    is_loopback,
    load_settings,
    parse_http,
)

__all__ = [
    "ServerSettings",
    "DatasetSettings",
    "PipelineSettings",
    "LogLevel",
    "load_settings",
    "parse_http",
    "is_loopback",
]
