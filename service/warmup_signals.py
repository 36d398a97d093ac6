"""Stopping the warm-up on a signal: ``DecodeScheduler.warmup`` decodes for a while before the server serves,
and a replica stopped meanwhile (SIGTERM, or Ctrl-C) should exit at the next decode, not after the whole warm-up.

Python runs signal handlers in the main thread only, so the handler sets an event that the model thread reads
between its decodes (``stopped``), and passes the signal on to the handler in place.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from service.errors import StartupError


def stopped(stop: threading.Event) -> None:
    """Raises ``StartupError`` once ``stop`` is set (a signal arrived during the warm-up)."""
    if stop.is_set():
        raise StartupError("stopped by a signal during the warm-up")


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Sets ``stop`` on SIGTERM or SIGINT and passes the signal on to the handler in place (uvicorn's, which
    shuts the server down once it has started). Only in the main thread, where Python runs signal handlers;
    elsewhere (a test's app) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, frame: FrameType | None) -> None:
        before = previous[signal.Signals(signum)]
        if before == signal.SIG_IGN:
            return
        stop.set()
        if callable(before):
            before(signum, frame)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)
