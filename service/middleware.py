"""Pure-ASGI middleware: request ids with an access log line, the request body limit, startup failures.

Pure ASGI (not ``BaseHTTPMiddleware``) so the request-id context variable is
visible to the handlers and nothing buffers the response.

* ``RequestContextMiddleware`` takes a sane ``X-Request-ID`` from the client or
  makes one, sets it for logging, echoes it in the response, notes the arrival
  time in the scope and logs one JSON line per request with status and duration.
* ``BodyLimitMiddleware`` answers 413 before reading a body whose declared
  ``Content-Length`` is too large, and counts the bytes of a streamed body
  (no length) so a chunked upload cannot get around the limit either.
* ``StartupFailureMiddleware`` keeps a bad checkpoint to the one log line the
  lifespan writes: Starlette hands the server the traceback of a failed startup
  to log, which for a ``CheckpointError`` (an operator's file to fix, not a
  bug to trace) only buries the line that names the file.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.checkpoint_error import CheckpointError
from service.errors import StartupError, error_body
from service.json_logs import reset_request_id, set_request_id

access_log = logging.getLogger("service.access")
ARRIVAL_KEY = "vstar.arrival"  # scope key: time.perf_counter() when the request arrived
_CLIENT_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # fullmatch: "$" would also take a final newline


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, log_requests: bool = True) -> None:
        self.app = app
        self.log_requests = log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "")
        rid = given if _CLIENT_ID_RE.fullmatch(given) else uuid.uuid4().hex
        token = set_request_id(rid)
        start = time.perf_counter()
        scope[ARRIVAL_KEY] = start  # VED's latency cap counts from here, body parsing included
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["x-request-id"] = rid
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.log_requests:
                access_log.info(
                    "request",
                    extra={
                        "method": scope.get("method"),
                        "path": scope.get("path"),
                        "status": status,
                        "duration_ms": round((time.perf_counter() - start) * 1000, 2),
                    },
                )
            reset_request_id(token)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and self._over_the_limit(declared):
            message = f"request body: larger than the limit of {self.max_bytes} bytes"
            await JSONResponse(error_body("payload_too_large", message), status_code=413)(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # raised inside the route's body read; FastAPI re-raises HTTPException as is,
                    # so the app's handler answers 413 with the usual error body
                    raise HTTPException(413, f"request body: larger than the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, receive if declared is not None else counting_receive, send)

    def _over_the_limit(self, declared: str) -> bool:
        """A ``Content-Length`` above the limit, or not a number (no ASCII digits). Compared by its digits' count
        first: int() refuses a string of more than 4,300 digits (a ValueError, so a 500)."""
        if not (declared.isascii() and declared.isdigit()):
            return True
        digits = declared.lstrip("0") or "0"
        return len(digits) > len(str(self.max_bytes)) or int(digits) > self.max_bytes


class StartupFailureMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_without_trace(message: Message) -> None:
            # sent from inside Starlette's ``except`` block, so the exception in hand is the startup's
            failed = message["type"] == "lifespan.startup.failed"
            if failed and isinstance(sys.exc_info()[1], CheckpointError | StartupError):
                message = {**message, "message": ""}  # the server logs a non-empty message, a traceback here
            await send(message)

        await self.app(scope, receive, send_without_trace)
