"""Bearer-token checks: every route but the probes needs the token when one is configured (and one
must be, off loopback); ``http_public_reads`` opens the GET routes. Compared in constant time."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from stoker.server.control.deps import get_settings
from stoker.server.settings import ServerSettings

_bearer = HTTPBearer(auto_error=False)


def _check(settings: ServerSettings, credentials: HTTPAuthorizationCredentials | None) -> None:
    if settings.http_token is None:
        return
    expected = settings.http_token.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials is not None else b""
    if not hmac.compare_digest(given, expected):
        raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})


def require_read_token(
    settings: Annotated[ServerSettings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Pass for GET routes when reads are public, otherwise as :func:`require_token`."""
    if settings.http_public_reads:
        return
    _check(settings, credentials)


def require_token(
    settings: Annotated[ServerSettings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Pass when no token is configured (loopback only, enforced at start-up) or it matches."""
    _check(settings, credentials)
