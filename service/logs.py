"""JSON log lines carrying the request id, and the middleware that assigns one (or keeps the caller's
`X-Request-ID`) and writes one access line per request."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["setup_logging", "RequestIdMiddleware", "request_id", "JsonFormatter", "PROBE_PATHS"]

request_id: ContextVar[str] = ContextVar("request_id", default="-")
"""Set by the middleware for the whole request, reset after it. Starlette runs sync routes and dependencies
through anyio's thread pool, which copies the context, so log lines from worker threads carry it too."""
access_log = logging.getLogger("prunecascade.access")
error_log = logging.getLogger("prunecascade.error")
_INTERNAL_ERROR = json.dumps(
    {"detail": [{"loc": [], "msg": "internal error; the log has it under this request id", "type": "internal_error"}]}
).encode()
_VALID_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
"""Liveness and readiness probes: polled every few seconds by orchestrators, so their access lines are debug."""
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `extra={...}` fields are kept as keys."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": request_id.get(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str, as_json: bool) -> None:
    root = logging.getLogger()
    root.setLevel(level.upper())
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if as_json else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root.handlers = [handler]


class RequestIdMiddleware:
    """Outermost of ours: assigns the id, writes the access line and, for an unhandled exception, logs the
    traceback while the id is still set (uvicorn would log it later, outside the request, with `-`) and
    answers 500 in the shared error shape."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _VALID_ID.match(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        started = time.perf_counter()
        status = [500]
        started_response = [False]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                started_response[0] = True
                status[0] = int(message["status"])
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            error_log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started_response[0]:
                raise  # too late for a 500: the server closes the connection
            status[0] = 500
            await send_wrapper(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", b"%d" % len(_INTERNAL_ERROR)),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": _INTERNAL_ERROR})
        finally:
            access_log.log(
                logging.DEBUG if scope.get("path") in PROBE_PATHS else logging.INFO,
                "%s %s %s",
                scope.get("method"),
                scope.get("path"),
                status[0],
                extra={"status": status[0], "ms": round((time.perf_counter() - started) * 1000.0, 2)},
            )
            request_id.reset(token)
