"""Structured logs: one JSON object per line, each carrying the request id.

The request id lives in a context variable set by ``RequestContextMiddleware``
(``service.middleware``), so every log call made while handling a request is
tagged without passing the id around. ``extra={...}`` fields are merged into
the JSON object.

No secret reaches a log line: settings dump their secrets masked
(``service.settings``), and as a last guard every line has the password of any
URL with credentials (``redis://user:password@host``, or ``?password=`` in its query) replaced by ``***``,
wherever it comes from (an exception message, a library's log).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from datetime import UTC, datetime

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id", "color_message"}
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@\"]*:)[^\s/@\"]+@")
# redis-py also reads passwords from the query: ?password=... and the TLS key's ?ssl_password=...
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&][A-Za-z0-9_]*password=)[^\s&#\"]+", re.IGNORECASE)


def redact_urls(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***@host`` and ``...?password=secret`` ->
    ``...?password=***`` (any query parameter whose name ends in "password", ``ssl_password`` too), everywhere
    in ``text``."""
    return _QUERY_PASSWORD.sub(r"\g<head>***", _URL_PASSWORD.sub(r"\g<head>***@", text))


def current_request_id() -> str:
    return _request_id.get()


def set_request_id(request_id: str) -> contextvars.Token[str]:
    return _request_id.set(request_id)


def reset_request_id(token: contextvars.Token[str]) -> None:
    _request_id.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": record.__dict__.get("request_id", _request_id.get()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return redact_urls(json.dumps(entry, default=str))


class RequestIdFilter(logging.Filter):
    """Stamps the current request id on the record (before a thread hop could lose it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.setdefault("request_id", _request_id.get())
        return True


def configure_logging(level: str) -> None:
    """Route the root logger (and uvicorn's) to one JSON handler on stderr; idempotent."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    # our access log replaces uvicorn's, which has no request id
    logging.getLogger("uvicorn.access").disabled = True
