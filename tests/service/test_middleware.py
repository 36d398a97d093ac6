"""The middlewares' header checks, called as ASGI apps with raw headers: uvicorn refuses these headers before the
app sees them, but another ASGI server (or a proxy speaking ASGI) may pass them on."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from service.middleware import BodyLimitMiddleware, RequestContextMiddleware


async def _ok(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def _call(app: Any, headers: list[tuple[bytes, bytes]]) -> list[Message]:
    scope = {"type": "http", "method": "POST", "path": "/recommend", "headers": headers}
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def test_a_content_length_of_other_digits_is_refused_not_a_500() -> None:
    """Byte 0xb2 reads (latin-1) as '²': a digit to str.isdigit, not to int(), so the check raised (a 500)."""
    sent = _call(BodyLimitMiddleware(_ok, max_bytes=100), [(b"content-length", b"\xb2")])
    assert sent[0]["status"] == 413
    assert _call(BodyLimitMiddleware(_ok, max_bytes=100), [(b"content-length", b"2")])[0]["status"] == 200


def test_a_content_length_of_more_digits_than_int_reads_is_refused_not_a_500() -> None:
    """int() refuses a string of more than 4,300 digits: a ValueError, and so a 500. Leading zeros do not count."""
    for declared, status in [(b"9" * 5000, 413), (b"0" * 5000 + b"100", 200), (b"0" * 5000 + b"101", 413)]:
        assert _call(BodyLimitMiddleware(_ok, max_bytes=100), [(b"content-length", declared)])[0]["status"] == status


def test_a_request_id_with_a_final_newline_is_replaced() -> None:
    """'$' also matched before a final newline, so such an id was echoed into the response header and logs."""
    sent = _call(RequestContextMiddleware(_ok, log_requests=False), [(b"x-request-id", b"abc\n")])
    ids = [value for key, value in sent[0]["headers"] if key == b"x-request-id"]
    assert len(ids) == 1 and ids[0] != b"abc\n" and len(ids[0]) == 32  # a fresh uuid4 hex
    sent = _call(RequestContextMiddleware(_ok, log_requests=False), [(b"x-request-id", b"abc")])
    assert [value for key, value in sent[0]["headers"] if key == b"x-request-id"] == [b"abc"]
