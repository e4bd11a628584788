"""The server's settings: one model (:mod:`.model`), read from TOML, the environment and the command
line (:mod:`.sources`), with ``stoker serve`` flags generated from it (:mod:`.flags`)."""

from stoker.server.settings.flags import add_setting_flags, given_settings
from stoker.server.settings.host import bind_host, is_loopback, parse_http, usable_cores
from stoker.server.settings.model import (
    LIVE,
    DatasetSettings,
    EngineSettings,
    LogLevel,
    OnError,
    PipelineSettings,
    ServerSettings,
)
from stoker.server.settings.sources import load_settings

__all__ = [
    "EngineSettings",
    "ServerSettings",
    "DatasetSettings",
    "PipelineSettings",
    "OnError",
    "LogLevel",
    "LIVE",
    "load_settings",
    "add_setting_flags",
    "given_settings",
    "parse_http",
    "is_loopback",
    "bind_host",
    "usable_cores",
]
