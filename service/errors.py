"""Every bad input becomes a 4xx naming the field; nothing reaches the client as a 500 traceback. One error
body shape for every status (FastAPI's 422 shape, `ErrorBody`), documented per route with `error_responses`."""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from cascade.errors import RequestError
from models.registry import BrokenEntryError, RegistryError
from service.checkpoints import UploadError
from service.state import ConflictError

__all__ = [
    "install_error_handlers",
    "field_error",
    "ErrorItem",
    "ErrorBody",
    "ERROR_RESPONSES",
    "error_responses",
    "MAX_REPORTED_ERRORS",
]

MAX_REPORTED_ERRORS = 20
"""A 422 lists at most this many errors (then one item counting the rest): a body of 240,000 bad items must not
become a 24 MB answer."""


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="where: `body`, then the field path (empty for the whole request)")
    msg: str
    type: str


class ErrorBody(BaseModel):
    """Every 4xx/5xx of this service (FastAPI's validation-error shape, for all of them)."""

    detail: list[ErrorItem]


_DESCRIPTIONS = {
    400: "malformed request (e.g. an invalid Content-Length)",
    401: "missing or wrong admin token",
    403: "admin routes are closed: no admin token is configured",
    404: "unknown model name or version",
    408: "the request body did not arrive in time",
    409: "conflicts with the current state (e.g. the active version)",
    413: "body or upload part too large",
    415: "a JSON body sent without `Content-Type: application/json`, or an upload that is not a safetensors file "
    "(pickles are refused)",
    422: "invalid input; `loc` names the field",
    429: "too many requests",
    500: "internal error (logged with the request id)",
    503: "not ready yet, or the query queue is full (see Retry-After)",
    504: "the server-side deadline passed",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in _DESCRIPTIONS.items()
}
"""For a route decorator's `responses=`: every status this service can answer with an `ErrorBody`."""


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for the given statuses, each with the shared `ErrorBody` schema."""
    return {code: ERROR_RESPONSES[code] for code in codes}


def field_error(
    status: int, field: str, message: str, kind: str = "value_error", headers: dict[str, str] | None = None
) -> JSONResponse:
    """FastAPI's own error shape, so clients parse one format for schema and semantic errors alike."""
    parts = ["body", *field.replace("]", "").replace("[", ".").split(".")] if field else []
    loc = [int(p) if p.isdigit() else p for p in parts]
    return JSONResponse(
        status_code=status, content={"detail": [{"loc": loc, "msg": message, "type": kind}]}, headers=headers
    )


def _is_error_items(detail: Any) -> bool:
    return (
        isinstance(detail, list)
        and bool(detail)
        and all(isinstance(d, dict) and {"loc", "msg", "type"} <= set(d) for d in detail)
    )


def capped_errors(errors: list[dict[str, Any]], limit: int = MAX_REPORTED_ERRORS) -> list[dict[str, Any]]:
    """The first `limit` errors without their input (a NaN in it would make the answer unserialisable), then
    one item saying how many more there were."""
    out: list[dict[str, Any]] = [
        {"loc": list(e["loc"])[:32], "msg": str(e["msg"])[:500], "type": e["type"]} for e in errors[:limit]
    ]
    if len(errors) > limit:
        out.append({"loc": [], "msg": f"{len(errors) - limit} more errors not shown", "type": "too_many_errors"})
    return out


_NO_GADGET = re.compile(r"needs a gadget; (?P<name>[a-z0-9._-]+) has none$")


def _stored_not_loaded(request: Request, exc: RequestError) -> str | None:
    """For a stage whose aggregator needs a gadget the served variant lacks: when a gadget is stored beside the
    served version on disk (written after the snapshot was built, e.g. by `prunecascade gadget`), say so and
    how to serve it, instead of "has none"."""
    match = _NO_GADGET.search(exc.message) if exc.field.endswith(".aggregator") else None
    state = getattr(request.app.state, "service", None)
    snapshot = state.snapshot if state is not None else None
    if match is None or snapshot is None:
        return None
    variant = snapshot.variants.get(match["name"])
    if variant is None:
        return None
    try:
        stored = state.registry.gadget_digest(variant.name, variant.version)
    except RegistryError:
        return None
    if stored is None:
        return None
    return (
        f"{exc.message.split(';')[0]}; {variant.name}:{variant.version} has a gadget stored but not loaded: "
        "POST /v1/admin/reload (or restart the server) to serve it"
    )


def _not_json(request: Request, errors: list[dict[str, Any]]) -> str | None:
    """How a request whose whole JSON body was refused sent it, when not as JSON (FastAPI reads a body as JSON only
    under an `application/json` or `application/*+json` Content-Type; `curl -d` sends
    `application/x-www-form-urlencoded`), else None: such a client is told what to send, not that its object is
    not an object."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return None
    if not any(tuple(e.get("loc", ())) == ("body",) for e in errors):
        return None
    return f"it came as {media[:100]}" if media else "it came without one"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def stage_error(request: Request, exc: RequestError) -> JSONResponse:
        return field_error(422, exc.field, _stored_not_loaded(request, exc) or exc.message)

    @app.exception_handler(UploadError)
    async def upload_error(_request: Request, exc: UploadError) -> JSONResponse:
        return field_error(exc.status, exc.field, exc.message)

    @app.exception_handler(RegistryError)
    async def registry_error(_request: Request, exc: RegistryError) -> JSONResponse:
        return field_error(404, "name", str(exc.args[0]) if exc.args else "not found", "not_found")

    @app.exception_handler(BrokenEntryError)
    async def broken_entry(_request: Request, exc: BrokenEntryError) -> JSONResponse:
        """A version whose manifest on disk does not validate cannot be served: refused, never a 500."""
        return field_error(409, "version", str(exc), "broken_entry")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """401/403/404/405/503 from FastAPI, auth and routing: the same body shape as a 422."""
        if _is_error_items(exc.detail):  # already in the shared shape (a route naming its field): kept as is
            return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail}, headers=exc.headers)
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400:
            # FastAPI's and Starlette's 400 for a body they cannot decode (bad UTF-8, broken multipart): invalid
            # input like any other, so the documented 422 naming the body.
            msg = f"the body could not be decoded: {detail}"[:300]
            return JSONResponse(
                status_code=422, content={"detail": [{"loc": ["body"], "msg": msg, "type": "body_invalid"}]}
            )
        kind = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )
        return field_error(exc.status_code, "", detail, kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(ConflictError)
    async def conflict_error(_request: Request, exc: ConflictError) -> JSONResponse:
        return field_error(409, "", str(exc), "conflict")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """Without echoing the input back, and at most MAX_REPORTED_ERRORS of them (then a count); a body that was
        not sent as JSON is a 415 saying so."""
        errors = list(exc.errors())
        media = _not_json(request, errors)
        if media is not None:
            msg = f"the body must be JSON, sent with Content-Type: application/json ({media})"
            return field_error(415, "", msg, "unsupported_media_type")
        return JSONResponse(status_code=422, content={"detail": capped_errors(errors)})
