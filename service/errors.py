"""Domain exceptions and the one place that turns them into HTTP responses.

Every error a client sees has the body ``{"error": {"type": ..., "message": ...}}``.
Routes and the recommender raise the exceptions below; ``install_error_handling``
registers one handler per kind, the mappings of FastAPI's validation errors
(422, message naming each field) and Starlette's routing errors (404/405), and
a catch-all middleware: any other exception becomes a 500 whose body carries
only the request id, while the trace goes to the log under that id.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.json_logs import current_request_id

log = logging.getLogger("service.errors")


class StartupError(Exception):
    """A setting the service cannot run with, found while it starts (a Redis that refuses the URL's database or
    credentials): the start stops with one log line naming it, as for a broken checkpoint."""


class ServiceError(Exception):
    """Base of the errors a client may see; ``status`` and ``type`` pick the response."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServiceError):
    """A field is well-typed but its value is not acceptable (unknown items, bad SIDs, ...)."""

    status = 422
    type = "invalid_request"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class Unauthorized(ServiceError):
    """A write without one of the configured API keys."""

    status = 401
    type = "unauthorized"


class NotFound(ServiceError):
    status = 404
    type = "not_found"


class IdempotencyConflict(ServiceError):
    """The Idempotency-Key was used before for a different write (other items, in another order)."""

    status = 422
    type = "invalid_request"

    def __init__(self) -> None:
        super().__init__("Idempotency-Key: already used for other items; a new write needs a new key")


class StoreUnavailable(ServiceError):
    """Redis is configured but cannot be reached; the request needs it."""

    status = 503
    type = "store_unavailable"


class NotReady(ServiceError):
    status = 503
    type = "not_ready"


class UnsupportedMediaType(ServiceError):
    """A body that is not declared JSON (``content-type`` missing or another type)."""

    status = 415
    type = "unsupported_media_type"


def shorten(text: str, limit: int = 48) -> str:
    """What a message quotes of client input: at most ``limit`` characters (a 50 kB key is not echoed back)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_body(type_: str, message: str) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message}}


def validation_reason(err: Mapping[str, Any]) -> str:
    """What one error of pydantic's list says: a validator's own ``ValueError`` in its own words, without the
    "Value error, " label pydantic puts before it."""
    error = err.get("ctx", {}).get("error")
    return str(error) if err.get("type") == "value_error" and error is not None else str(err.get("msg", "invalid"))


def validation_message(errors: Sequence[Any], limit: int = 5) -> str:
    """``"body.k: Input should be less than or equal to 100; ..."`` for FastAPI's error list."""
    parts = []
    for err in list(errors)[:limit]:
        loc = ".".join(shorten(str(p)) for p in err.get("loc", ()))  # unknown field names are client input
        parts.append(f"{loc}: {shorten(validation_reason(err), 200)}")
    if len(errors) > limit:
        parts.append(f"... and {len(errors) - limit} more")
    return "; ".join(parts) or "invalid request"


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return JSONResponse(error_body(exc.type, exc.message), status_code=exc.status, headers=headers)


def unreadable_body(error: BaseException | None) -> str:
    """What FastAPI's "There was an error parsing the body" (a 400) hides, from the error behind it: what Python's
    JSON reader refuses in a body that may well be JSON."""
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text (byte {error.start})"
    if isinstance(error, RecursionError):
        return "arrays and objects nested deeper than the JSON reader's limit (about 1000 levels)"
    if isinstance(error, ValueError) and "integer string conversion" in str(error):
        return f"an integer of more than {sys.get_int_max_str_digits()} digits"
    return (
        f"not UTF-8 text, an integer of more than {sys.get_int_max_str_digits()} digits, or arrays and objects nested "
        "deeper than the reader's limit (about 1000 levels)"
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    syntax = [e for e in errors if e.get("type") == "json_invalid"]
    if syntax:  # not JSON at all, like a body the reader refuses (400 below), not a JSON value that fails the schema
        loc, reason = syntax[0].get("loc", ()), syntax[0].get("ctx", {}).get("error", "")
        where = f" at character {loc[1]}" if len(loc) > 1 else ""
        message = f"body: not valid JSON{where}" + (f": {shorten(str(reason), 200)}" if reason else "")
        return JSONResponse(error_body("invalid_request", message), status_code=400)
    if any(e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",) for e in errors):
        # an empty body: no JSON at all, as a cut-short one (FastAPI reads it as a body not sent)
        return JSONResponse(error_body("invalid_request", "body: not valid JSON: the body is empty"), status_code=400)
    return JSONResponse(error_body("invalid_request", validation_message(errors)), status_code=422)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
        exc.status_code, "http_error"
    )
    # FastAPI's only 400 is a body it cannot read: name the body as the field, and what its reader refuses
    message = (
        f"body: cannot be read as JSON: {unreadable_body(exc.__cause__)}" if exc.status_code == 400 else str(exc.detail)
    )
    return JSONResponse(error_body(kind, message), status_code=exc.status_code, headers=exc.headers)


class CatchAllMiddleware:
    """Outermost-but-one layer: an unhandled exception becomes a bare 500 with the request id.

    Done here rather than in Starlette's ``ServerErrorMiddleware`` so the trace is
    logged once, with the request id, and the exception does not reach the server.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            rid = current_request_id()
            log.exception("unhandled error", extra={"path": scope.get("path"), "method": scope.get("method")})
            if started:  # headers are gone; all we can do is drop the connection
                raise
            body = error_body("internal_error", f"internal server error (request id {rid})")
            await JSONResponse(body, status_code=500)(scope, receive, send)


def install_error_handling(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(CatchAllMiddleware)
