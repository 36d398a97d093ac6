"""Prometheus metrics, one registry per app (tests build many apps in one process).

With ``--workers N`` each worker process keeps its own registry, so a scrape
sees the worker that answered it; run one worker per container (the usual
layout) or scrape workers individually.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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
            "How much earlier than its cap a VED search is told to stop.",
            registry=r,
        )
        self.ved_cap_lateness = Gauge(
            "vstar_ved_cap_lateness_seconds",
            "How far VED's hard cap is brought forward for the event loop's recent lateness in honouring it.",
            registry=r,
        )
        self.store_errors = Counter(
            "vstar_store_errors", "Store operations that failed (Redis down).", ["op"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
