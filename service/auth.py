"""Bearer-token auth of the admin routes. No token configured: closed (403), never open by accident.
Missing or wrong token: 401. The comparison is constant-time. `AdminGate` checks it before the route reads its
body (FastAPI parses a form before it runs the route's dependencies, so a broken multipart without a token
would otherwise get a 422 about the body); `require_admin` documents it in OpenAPI and checks it again."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["require_admin", "bearer", "AdminGate", "ADMIN_PREFIX"]

ADMIN_PREFIX = "/v1/admin"
_CLOSED = "admin routes are closed: no admin token is configured"
_WRONG = "missing or wrong admin token"


def _refusal(expected: str | None, authorization: str | None) -> tuple[int, str] | None:
    """(status, message) when the request may not use an admin route, None when its token is right."""
    if expected is None:
        return 403, _CLOSED
    scheme, _, given = (authorization or "").partition(" ")
    given = given.strip() if scheme.lower() == "bearer" else ""
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        return 401, _WRONG
    return None


class AdminGate:
    """Pure ASGI: requests under /v1/admin without the right token are answered 401/403 before anything reads
    their body."""

    def __init__(self, app: ASGIApp, token: Callable[[], str | None]) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
            header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            refused = _refusal(self.token(), header)
            if refused is not None:
                status, msg = refused
                kind = "unauthorized" if status == 401 else "forbidden"
                body = json.dumps({"detail": [{"loc": [], "msg": msg, "type": kind}]}).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
                if status == 401:
                    headers.append((b"www-authenticate", b"Bearer"))
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


bearer = HTTPBearer(auto_error=False, description="PRUNECASCADE_ADMIN_TOKEN (or the token file)")


def require_admin(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    expected = request.app.state.service.settings.resolved_admin_token()
    given = f"{credentials.scheme} {credentials.credentials}" if credentials is not None else None
    refused = _refusal(expected, given)
    if refused is not None:
        headers = {"WWW-Authenticate": "Bearer"} if refused[0] == 401 else None
        raise HTTPException(status_code=refused[0], detail=refused[1], headers=headers)
