"""The response cache: a request's key, and the answers read from and written to the store under it.

The key is the cache's format (``CACHE_FORMAT``), the model version and the normalised request: the SIDs the
prompt actually sees (the last ``max_history``), when fused with transition counts the weight and the items of
the counts' window (items sharing a SID rank apart then), the exclusion set when exclusion is on, ``k``, the mode
and, for VED only, the search as run (its config, the budget resolved, so no budget and VED's own for its k are
one entry; the checkpoint's VED settings, which the model version does not hash). Never the cap: only answers it
did not cut are cached (``service.recommender``), and those are the full search's, whatever the cap was. A
user's new event changes the key, so the cache never needs invalidating.

An entry that does not read as an answer (``Answer.from_json``: corrupt, or of another layout), or that names an
item id the catalog does not hold (the response looks its external id up: a 500), is a miss, logged, and the
search's answer replaces it. The store calls go through ``StoreCalls``: a VED request's reads and write
are bounded by its cap, and a store that fails is a miss (read) or an answer that goes out uncached (write).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Container
from dataclasses import asdict
from typing import Any

from models.sid_catalog import sid_to_str
from models.transition import ShallowFusion
from models.ved_config import VEDConfig
from service.answer import CACHE_FORMAT, Answer
from service.decode_scheduler import DecodePlan
from service.errors import StoreUnavailable
from service.metrics import ServiceMetrics
from service.schemas import RecommendRequest
from service.store_calls import StoreCalls
from service.stores import Store

log = logging.getLogger("service.recommender")


class ResponseCache:
    """Answers by normalised request, in ``store`` for ``ttl_s`` seconds (0: the cache is off)."""

    def __init__(
        self,
        store: Store,
        calls: StoreCalls,
        metrics: ServiceMetrics,
        ttl_s: int,
        model_version: str,
        fusion: ShallowFusion | None,
        items: Container[int],
    ) -> None:
        self.store, self.calls, self.metrics = store, calls, metrics
        self.ttl_s, self.model_version, self.fusion = ttl_s, model_version, fusion
        self.items = items  # the catalog's item ids: an entry naming another is corrupt

    def key(self, req: RecommendRequest, plan: DecodePlan) -> str | None:
        """The request's key (module doc); None when the cache is off."""
        if not self.ttl_s:
            return None
        norm: dict[str, Any] = {
            "f": CACHE_FORMAT,
            "v": self.model_version,
            "h": [sid_to_str(sid) for sid in plan.job.history],
            "x": sorted(plan.excluded),
            "k": req.k,
            "m": req.mode,
        }
        if self.fusion is not None:  # the items themselves rank, not only their SIDs, and by the weight served
            norm |= {"t": list(plan.job.items), "w": self.fusion.weight}
        if isinstance(plan.config, VEDConfig):  # the search as run, its budget resolved: the checkpoint's settings
            # (the model version does not hold them) and the request's; never the cap: an answer it cut is not cached
            norm["b"] = {name: value for name, value in asdict(plan.config).items() if name != "deadline"}
        return hashlib.sha256(json.dumps(norm, separators=(",", ":")).encode()).hexdigest()

    async def get(self, key: str, by: float | None) -> Answer | None:
        """The answer stored under ``key``, or None (none, unreadable, the store unavailable or out of time, or the
        version changed while it was read). ``key`` is taken in the same turn of the loop, under the version in
        force."""
        version = self.model_version
        try:
            raw = await self.calls.within("read_cache", self.store.cache_get(key), by)
        except StoreUnavailable:
            raw = None
        if self.model_version != version:  # a new list of unavailable items meanwhile: the entry may hold one
            raw = None
        answer = None
        if raw is not None:
            try:
                answer = self._read(raw)
            except ValueError as e:  # a corrupt entry: a miss, and the search's answer replaces it
                log.warning("unreadable response cache entry, treated as a miss", extra={"key": key, "error": str(e)})
        self.metrics.cache.labels("hit" if answer is not None else "miss").inc()
        return answer

    def _read(self, raw: bytes) -> Answer:
        """``Answer.from_json``, and ``ValueError`` for an item id the catalog does not hold."""
        answer = Answer.from_json(raw)
        unknown = next((i for it in answer.items for i in it.item_ids if i not in self.items), None)
        if unknown is not None:
            raise ValueError(f"not a cached answer: item id {unknown} is not in the catalog")
        return answer

    async def set(self, key: str, answer: Answer, by: float | None) -> None:
        """Store ``answer`` under ``key``; a store that fails leaves it uncached (counted by ``StoreCalls``)."""
        with contextlib.suppress(StoreUnavailable):
            await self.calls.within("write_cache", self.store.cache_set(key, answer.to_json(), self.ttl_s), by)
