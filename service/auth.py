"""Bearer-token auth of the admin routes. No token configured: closed (403), never open by accident.
Missing or wrong token: 401. The comparison is constant-time."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

__all__ = ["require_admin", "bearer"]

bearer = HTTPBearer(auto_error=False, description="PRUNECASCADE_ADMIN_TOKEN (or the token file)")


def require_admin(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    expected = request.app.state.service.settings.resolved_admin_token()
    if expected is None:
        raise HTTPException(status_code=403, detail="admin routes are closed: no admin token is configured")
    given = credentials.credentials if credentials is not None and credentials.scheme.lower() == "bearer" else ""
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(
            status_code=401, detail="missing or wrong admin token", headers={"WWW-Authenticate": "Bearer"}
        )
