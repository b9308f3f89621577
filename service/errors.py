"""Every bad input becomes a 4xx naming the field; nothing reaches the client as a 500 traceback."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cascade.snapshot import StageError
from models.registry import RegistryError
from service.checkpoints import UploadError
from service.state import ConflictError

__all__ = ["install_error_handlers", "BodySizeLimit", "field_error"]


def field_error(status: int, field: str, message: str, kind: str = "value_error") -> JSONResponse:
    """FastAPI's own error shape, so clients parse one format for schema and semantic errors alike."""
    parts = ["body", *field.replace("]", "").replace("[", ".").split(".")]
    loc = [int(p) if p.isdigit() else p for p in parts]
    return JSONResponse(status_code=status, content={"detail": [{"loc": loc, "msg": message, "type": kind}]})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StageError)
    async def stage_error(_request: Request, exc: StageError) -> JSONResponse:
        return field_error(422, exc.field, exc.message)

    @app.exception_handler(UploadError)
    async def upload_error(_request: Request, exc: UploadError) -> JSONResponse:
        return field_error(exc.status, exc.field, exc.message)

    @app.exception_handler(RegistryError)
    async def registry_error(_request: Request, exc: RegistryError) -> JSONResponse:
        return field_error(404, "name", str(exc.args[0]) if exc.args else "not found", "not_found")

    @app.exception_handler(ConflictError)
    async def conflict_error(_request: Request, exc: ConflictError) -> JSONResponse:
        return field_error(409, "", str(exc), "conflict")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """Without echoing the input back: a NaN in it would make the error itself unserialisable."""
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": errors})


class BodySizeLimit:
    """Pure ASGI, so the body is never read twice: refuse by Content-Length before reading, or buffer a
    chunked body up to the limit. `per_path` raises the limit for given exact paths (checkpoint uploads)."""

    def __init__(self, app: ASGIApp, max_bytes: int, per_path: dict[str, int] | None = None) -> None:
        self.app = app
        self.default_max = max_bytes
        self.per_path = per_path or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope.get("path", ""), self.default_max)
        await _Limited(self.app, limit)(scope, receive, send)


class _Limited:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            status = 413 if declared.isdigit() else 400
            msg = f"body larger than {self.max_bytes} bytes" if status == 413 else "invalid Content-Length"
            await field_error(status, "", msg)(scope, receive, send)
            return
        if declared is not None:
            await self.app(scope, receive, send)
            return
        # No length given (chunked): buffer at most max_bytes, then replay to the app.
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await field_error(413, "", f"body larger than {self.max_bytes} bytes", "too_large")(
                    scope, receive, send
                )
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)
