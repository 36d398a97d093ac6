"""VED deadlines that keep the latency cap: the hard cap's last chance to answer (the cap less
``ved_respond_ms``), less what a search runs past its deadline.

VED checks its deadline before each step (and within a step's selections once
it has a child to evaluate), so a search stopped by the deadline still finishes
the forward of the step it is in, then ranks its leaves, and the response is
serialised after that. How long that tail takes depends on the machine, the
batch and the load, so it is learnt rather than guessed: every search whose
loop ran and was stopped by its deadline reports how far past the deadline it
finished (the model thread reports it, so it counts even when the hard cap
answered the request from popularity meanwhile); the next deadline is set earlier by a high
quantile of the recent reports (never less than the static ``ved_margin_ms``).

Reports expire after ``horizon_s``, so a burst of load on the machine raises the
margin only while it lasts. Requests whose deadline passed before the loop
started (the anytime fallback) report nothing: their overrun is the initial
tree's cost, which no earlier deadline can shorten, and counting it would push
every later deadline in front of the loop.

``BatchCost`` is the other half: how long one kind of decode takes for a batch,
per batch-size bucket (the next power of two). The decode scheduler
(``service.decode_scheduler``) keeps two: VED's initial tree (prefill, the
initial beam tree with every node's value, ranking),
below whose cost a request is answered by a plain beam search instead (the
anytime fallback), and that initial beam itself, below whose cost the request
is not decoded at all (it is answered from popularity at once: load shedding).
The cost is a baseline per bucket (the start value, replaced by the warm-up's
own timing) raised by a high quantile of recent reports: under load a decode
costs more than it did at startup, and the reports say by how much; they expire
after ``horizon_s``, like the margin's. They count only from ``min_reports`` on:
the initial tree's reports only ever come from searches that ran over, so one
stray spike would otherwise send every request of the next ``horizon_s`` to the
fallback, and none of those would report again; the initial beam's come from
fallbacks alone, so one spike would shed them all, and a shed job reports nothing.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence


def quantile(values: Sequence[float], q: float) -> float:
    """``np.quantile(values, q)`` (linear interpolation) in plain Python: read on the event loop for every VED
    request, where numpy's call overhead (tens of microseconds on a busy host) showed in loop profiles."""
    xs = sorted(values)
    h = (len(xs) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


class DeadlineMargin:
    def __init__(
        self,
        floor_s: float,
        quantile: float = 0.95,
        horizon_s: float = 30.0,
        window: int = 256,
        refresh_s: float = 0.0,  # recompute at most this often (a large window read on every request)
        clock: Callable[[], float] = time.monotonic,  # when reports were made and expire
    ) -> None:
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        self.floor_s = floor_s
        self.quantile = quantile
        self.horizon_s = horizon_s
        self.refresh_s = refresh_s
        self.clock = clock
        self._reports: deque[tuple[float, float]] = deque(maxlen=window)  # (monotonic time, overrun s)
        self._lock = threading.Lock()
        self._cached = (-math.inf, floor_s)  # (when computed, margin)

    def report(self, overrun_s: float) -> None:
        """How far past its deadline a deadline-stopped request was ready (may be negative)."""
        with self._lock:
            self._reports.append((self.clock(), overrun_s))

    def margin_s(self) -> float:
        """Seconds to subtract from a cap to get the deadline handed to VED."""
        now = self.clock()
        with self._lock:
            if now - self._cached[0] < self.refresh_s:
                return self._cached[1]
            while self._reports and now - self._reports[0][0] > self.horizon_s:
                self._reports.popleft()
            recent = [overrun for _, overrun in self._reports]
        margin = max(self.floor_s, self.floor_s + quantile(recent, self.quantile)) if recent else self.floor_s
        self._cached = (now, margin)
        return margin

    def deadline(self, arrival: float, cap_ms: float) -> float:
        """A ``time.perf_counter()`` deadline for a request that arrived at ``arrival`` with ``cap_ms``."""
        return arrival + cap_ms / 1000 - self.margin_s()


class BatchCost:
    def __init__(
        self,
        start_s: float,
        quantile: float = 0.9,
        horizon_s: float = 30.0,
        window: int = 64,
        min_reports: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if start_s <= 0:
            raise ValueError(f"start_s must be > 0, got {start_s}")
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        self.start_s, self.quantile, self.horizon_s, self.clock = start_s, quantile, horizon_s, clock
        self.min_reports = min_reports
        self._baseline: dict[int, float] = {}
        self._reports: defaultdict[int, deque[tuple[float, float]]] = defaultdict(lambda: deque(maxlen=window))
        self._lock = threading.Lock()

    @staticmethod
    def bucket(batch: int) -> int:
        """The least power of two >= ``batch``."""
        return 1 << max(batch - 1, 0).bit_length()

    def set_baseline(self, batch: int, seconds: float) -> None:
        """A direct timing of the decode for ``batch`` prompts (the warm-up's), replacing the start value."""
        with self._lock:
            self._baseline[self.bucket(batch)] = seconds

    def report(self, batch: int, seconds: float) -> None:
        """Wall time of a decode of ``batch`` prompts."""
        with self._lock:
            self._reports[self.bucket(batch)].append((self.clock(), seconds))

    def cost_s(self, batch: int) -> float:
        """Seconds the decode needs for ``batch`` prompts."""
        b, now = self.bucket(batch), self.clock()
        with self._lock:
            baseline = self._baseline.get(b, self.start_s)
            reports = self._reports[b]
            while reports and now - reports[0][0] > self.horizon_s:
                reports.popleft()
            recent = [seconds for _, seconds in reports]
        if len(recent) < self.min_reports:
            return baseline
        return max(baseline, quantile(recent, self.quantile))
