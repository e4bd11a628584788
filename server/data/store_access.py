"""Who object storage is talked to as, and what may be said of it: endpoint, region and credentials
from the AWS conventions (the environment, a named profile or shared files through botocore, else
obstore's own chain of web-identity, container and instance roles), and the redaction of every
credential from messages and logs."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from stoker.server.data.locators import StoreUnavailable

__all__ = ["connection_settings", "failure_reason", "redact"]

_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AROA|AIDA)[A-Z0-9]{12,}\b")
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
# Credentials from a profile are asked for again after this long; botocore refreshes expiring ones.
_PROFILE_CREDENTIALS_TTL = timedelta(minutes=5)
_SECRETS: set[str] = set()
"""Credentials a profile's provider handed out in this process (a forked child keeps a copy)."""


def redact(text: str) -> str:
    """``text`` with every credential this process knows of, access key ids and URL user info blanked out."""
    secrets = {os.environ.get(name, "") for name in _SECRET_VARIABLES} | _SECRETS
    for secret in sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, "***")
    return _URL_USERINFO.sub("***@", _ACCESS_KEY_ID.sub("***", text))


def failure_reason(exc: BaseException) -> str:
    """obstore's message cut to what helps: the request, the status, S3's error code and message."""
    text = str(exc).split("\n\nDebug source:", 1)[0]
    code = re.search(r"<Code>([^<]{1,100})</Code>", text)
    message = re.search(r"<Message>([^<]{1,300})</Message>", text)
    text = re.sub(r"\s+", " ", text.split("<?xml", 1)[0]).strip().rstrip(":")
    if code:
        text += f" ({code.group(1)}{': ' + message.group(1) if message else ''})"
    return redact(text)[:600]


def connection_settings() -> tuple[dict[str, Any], str]:
    """obstore's keyword arguments for endpoint, region and credentials, and where the credentials
    come from (for the log: never the credentials themselves)."""
    env = os.environ
    kwargs: dict[str, Any] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if env.get("AWS_ACCESS_KEY_ID"):
        source = "environment"  # obstore reads the keys and token itself
    elif _profiles_configured(env):
        provider, profile_region, profile_endpoint, source = _profile()
        if provider is not None:
            kwargs["credential_provider"] = provider
        region = region or profile_region
        endpoint = endpoint or profile_endpoint
    else:
        source = "obstore's chain (web identity, container or instance role)"
    if endpoint:
        kwargs["endpoint"] = endpoint
    if region:
        kwargs["region"] = region
    return kwargs, source


def _profiles_configured(env: Mapping[str, str]) -> bool:
    if env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE"):
        return True
    files = (env.get("AWS_CONFIG_FILE", "~/.aws/config"), env.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"))
    return any(os.path.isfile(os.path.expanduser(path)) for path in files)


def _profile() -> tuple[_ProfileCredentials | None, str | None, str | None, str]:
    """botocore's view of the active profile: credentials, region and endpoint_url."""
    import botocore.exceptions  # only here: ~250 ms and ~20 MB that most deployments never need
    import botocore.session

    try:
        session = botocore.session.Session()
        name = session.profile or "default"
        credentials = session.get_credentials()
        config = session.get_scoped_config()
    except botocore.exceptions.BotoCoreError as exc:
        raise StoreUnavailable(f"AWS configuration: {redact(str(exc))}") from None
    region, endpoint = config.get("region"), config.get("endpoint_url")
    if credentials is None:
        return None, region, endpoint, f"profile {name!r} has none; obstore's chain"
    return _ProfileCredentials(credentials), region, endpoint, f"profile {name!r} (botocore: {credentials.method})"


class _ProfileCredentials:
    """obstore's credential callback over botocore credentials (which refresh themselves)."""

    def __init__(self, credentials: Any) -> None:
        self._credentials = credentials

    def __call__(self) -> dict[str, Any]:
        frozen = self._credentials.get_frozen_credentials()
        _SECRETS.update(s for s in (frozen.access_key, frozen.secret_key, frozen.token) if s)
        return {
            "access_key_id": frozen.access_key,
            "secret_access_key": frozen.secret_key,
            "token": frozen.token,
            "expires_at": datetime.now(UTC) + _PROFILE_CREDENTIALS_TTL,
        }

    def __repr__(self) -> str:
        return "_ProfileCredentials(<hidden>)"
