"""Bearer-token check for the routes that change the server."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from stoker.server.control.deps import get_settings
from stoker.server.settings import ServerSettings

_bearer = HTTPBearer(auto_error=False)


def require_token(
    settings: Annotated[ServerSettings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Pass when no token is configured (loopback only, enforced at start-up) or it matches."""
    if settings.http_token is None:
        return
    expected = settings.http_token.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials is not None else b""
    if not hmac.compare_digest(given, expected):
        raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})
