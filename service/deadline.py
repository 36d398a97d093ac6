"""VED deadlines that keep the latency cap: the cap, less what a search runs past its deadline.

VED checks its deadline before each step, so a search stopped by the deadline
still finishes the step it is in, then ranks its leaves, and the response is
serialised after that. How long that tail takes depends on the machine, the
batch and the load, so it is learnt rather than guessed: every request whose
search loop ran and was stopped by its deadline reports how far past the
deadline its response was ready; the next deadline is set earlier by a high
quantile of the recent reports (never less than the static ``ved_margin_ms``).

Reports expire after ``horizon_s``, so a burst of load on the machine raises the
margin only while it lasts. Requests whose deadline passed before the loop
started (the anytime fallback) report nothing: their overrun is the initial
tree's cost, which no earlier deadline can shorten, and counting it would push
every later deadline in front of the loop.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np


class DeadlineMargin:
    def __init__(self, floor_s: float, quantile: float = 0.95, horizon_s: float = 30.0, window: int = 256) -> None:
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        self.floor_s = floor_s
        self.quantile = quantile
        self.horizon_s = horizon_s
        self._reports: deque[tuple[float, float]] = deque(maxlen=window)  # (monotonic time, overrun s)
        self._lock = threading.Lock()

    def report(self, overrun_s: float) -> None:
        """How far past its deadline a deadline-stopped request was ready (may be negative)."""
        with self._lock:
            self._reports.append((time.monotonic(), overrun_s))

    def margin_s(self) -> float:
        """Seconds to subtract from a cap to get the deadline handed to VED."""
        now = time.monotonic()
        with self._lock:
            while self._reports and now - self._reports[0][0] > self.horizon_s:
                self._reports.popleft()
            recent = [overrun for _, overrun in self._reports]
        if not recent:
            return self.floor_s
        return max(self.floor_s, self.floor_s + float(np.quantile(recent, self.quantile)))

    def deadline(self, arrival: float, cap_ms: float) -> float:
        """A ``time.perf_counter()`` deadline for a request that arrived at ``arrival`` with ``cap_ms``."""
        return arrival + cap_ms / 1000 - self.margin_s()
