"""Prometheus metrics, one registry per app (tests build many apps in one process).

With ``--workers N`` (``vstar serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` for
them, prometheus-client's multiprocess mode) every worker writes its metrics to
files there, and a scrape answered by any worker reads all of them: counters and
histograms are summed over the workers, and each gauge has one sample per live
worker (label ``pid``). A worker's gauges are written each second and at each
scrape it answers (``refresh``); a worker that stops removes its own, and the
supervisor those of a worker that died.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)


def multiprocess_mode() -> bool:
    """Whether prometheus-client writes metric values to ``PROMETHEUS_MULTIPROC_DIR`` (decided when it was first
    imported, from the environment)."""
    return values.ValueClass is not values.MutexValue


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = multiprocess_mode()
        self._tracked: list[tuple[Gauge, Callable[[], float]]] = []
        r = self.registry
        self.requests = Counter(
            "vstar_recommend_requests", "Recommendation requests by mode and outcome.", ["mode", "outcome"], registry=r
        )
        self.latency = Histogram(
            "vstar_recommend_latency_seconds",
            "Server time per answered recommendation.",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "vstar_beam_batch_size",
            "Requests merged into one beam decode.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.beam_between_ved = Counter(
            "vstar_beam_between_ved",
            "Beam requests decoded between a VED search's forwards, not after it (VSTAR_BEAM_BETWEEN_VED_STEPS).",
            registry=r,
        )
        self.cache = Counter("vstar_cache_lookups", "Response cache lookups.", ["result"], registry=r)
        self.cap_hits = Counter("vstar_ved_cap_hits", "VED searches stopped by the latency cap.", registry=r)
        self.ved_fallbacks = Counter(
            "vstar_ved_fallbacks",
            "VED requests answered without the tree: by its initial beam (too little time to grow it) or by the "
            "popularity list (too little time for any model work).",
            ["kind"],
            registry=r,
        )
        self.ved_tokens = Histogram(
            "vstar_ved_tokens_spent",
            "Tokens VED spent per request.",
            buckets=(16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
            registry=r,
        )
        self.ved_margin = Gauge(
            "vstar_ved_deadline_margin_seconds",
            "How much earlier than the hard cap's last chance (its cap less VSTAR_VED_RESPOND_MS and the cap "
            "lateness) a VED search is told to stop.",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.ved_cap_lateness = Gauge(
            "vstar_ved_cap_lateness_seconds",
            "How far VED's hard cap is brought forward for the event loop's recent lateness in honouring it.",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.store_errors = Counter(
            "vstar_store_errors", "Store operations that failed (Redis down).", ["op"], registry=r
        )
        self.unavailable_reloads = Counter(
            "vstar_unavailable_reloads",
            "Changes of VSTAR_UNAVAILABLE_ITEMS seen while serving: applied, or refused (the items in force kept).",
            ["result"],
            registry=r,
        )
        self.unavailable_items = Gauge(
            "vstar_unavailable_items",
            "Items never recommended (VSTAR_UNAVAILABLE_ITEMS), as in force.",
            registry=r,
            multiprocess_mode="liveall",
        )

    def track(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """``gauge`` shows ``read()`` as of each scrape (in multiprocess mode, as of this worker's last refresh)."""
        if self.multiprocess:
            self._tracked.append((gauge, read))
            gauge.set(read())
        else:
            gauge.set_function(read)

    def refresh(self) -> None:
        """Writes the tracked gauges' current values (multiprocess mode: other workers' scrapes read them)."""
        for gauge, read in self._tracked:
            gauge.set(read())

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        self.refresh()
        every_worker = CollectorRegistry()
        MultiProcessCollector(every_worker)
        return generate_latest(every_worker)

    def close(self) -> None:
        """This worker is stopping: its live gauges leave the scrape (multiprocess mode)."""
        if self.multiprocess:
            mark_process_dead(os.getpid())
