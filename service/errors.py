"""Every bad input becomes a 4xx naming the field; nothing reaches the client as a 500 traceback."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cascade.snapshot import StageError

__all__ = ["install_error_handlers", "BodySizeLimit", "BodyTooLarge", "field_error"]


class BodyTooLarge(Exception):
    """Raised while reading a body that exceeds the limit (chunked bodies have no Content-Length)."""


def field_error(status: int, field: str, message: str, kind: str = "value_error") -> JSONResponse:
    """FastAPI's own error shape, so clients parse one format for schema and semantic errors alike."""
    parts = ["body", *field.replace("]", "").replace("[", ".").split(".")]
    loc = [int(p) if p.isdigit() else p for p in parts]
    return JSONResponse(status_code=status, content={"detail": [{"loc": loc, "msg": message, "type": kind}]})


def install_error_handlers(app: FastAPI, max_body_bytes: int) -> None:
    @app.exception_handler(StageError)
    async def stage_error(_request: Request, exc: StageError) -> JSONResponse:
        return field_error(422, exc.field, exc.message)

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(_request: Request, _exc: BodyTooLarge) -> JSONResponse:
        return field_error(413, "", f"body larger than {max_body_bytes} bytes", "too_large")


class BodySizeLimit:
    """Pure ASGI: refuse by Content-Length before reading, or count bytes as they arrive."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            status = 413 if declared.isdigit() else 400
            msg = f"body larger than {self.max_bytes} bytes" if status == 413 else "invalid Content-Length"
            await field_error(status, "", msg)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        await self.app(scope, limited, send)
