"""A lean HTTP/1.1 client for ``vstar bench serve``: one keep-alive connection, JSON POSTs, the response parsed
by ``httptools`` (the C parser uvicorn itself uses).

Why not ``httpx``: the load generator shares the machine with the server, and batched answers arrive
together. A client library that spends a millisecond per response (``httpx`` does, here) makes the last of
eight simultaneous answers look several milliseconds slower than it was, which is the load generator, not
the service. The request bytes are written directly on asyncio streams and the time is taken from the
request's first byte written to the response's last byte read.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httptools
import httpx


class _Response:
    """httptools callbacks for one response."""

    def __init__(self, parser_of: Callable[[], httptools.HttpResponseParser]) -> None:
        self.body = bytearray()
        self.complete = False
        self.keep_alive = False
        self._parser_of = parser_of

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True
        # read here: once the message is complete the parser resets, and should_keep_alive() says False
        self.keep_alive = self._parser_of().should_keep_alive()


class LeanClient:
    """One keep-alive HTTP/1.1 connection for POSTing JSON; see the module docstring for why not ``httpx``."""

    def __init__(self, url: str, timeout_s: float) -> None:
        parsed = httpx.URL(url)
        self.host, self.port, self.timeout_s = parsed.host, parsed.port or 80, timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.connects = 0  # connections opened: one for the client's life unless the server closes it

    async def post(self, path: str, payload: dict[str, Any]) -> tuple[int, bytes, float]:
        """(status, body, seconds from the request's first byte written to the response's last byte read)."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            self.connects += 1
        data = json.dumps(payload).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\n\r\n"
        )
        response = _Response(lambda: parser)
        parser = httptools.HttpResponseParser(response)
        t0 = time.perf_counter()
        self._writer.write(head.encode() + data)
        await asyncio.wait_for(self._read(parser, response), self.timeout_s)
        elapsed = time.perf_counter() - t0
        if not response.keep_alive:
            await self.aclose()
        return parser.get_status_code(), bytes(response.body), elapsed

    async def _read(self, parser: httptools.HttpResponseParser, response: _Response) -> None:
        assert self._reader is not None
        while not response.complete:
            chunk = await self._reader.read(1 << 16)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            parser.feed_data(chunk)

    async def aclose(self) -> None:
        if self._writer is not None:
            self._writer.close()
            await self._writer.wait_closed()
            self._reader = self._writer = None
