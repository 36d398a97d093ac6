"""The recommender: the one object that does the service's work, built once at startup (the request side).

A request goes: its ``exclude_items`` resolved (a bad entry is a 422 before the
store is asked) -> history (stored + given, resolved against the catalog) ->
exclusion set -> response cache -> decode (micro-batched, on the model thread)
-> SIDs expanded to items, excluded items dropped, cut to k -> response.

Design decisions:

* The decoders work on SIDs; one SID can name several items, so each result
  row is a SID with all its items. ``exclude_history`` removes the user's items
  from those lists, and ``exclude_items`` the request's own (``resolve_exclusions``),
  and a SID whose items are all excluded is dropped; the decode asks for ``k``
  plus that many extra beams, so k items still come back when k exist.
* The response cache (``service.response_cache``) keys an answer by the model
  version and the normalised request (the SIDs the prompt sees, the exclusion
  set, k, the mode, the search as run), never by the cap: only answers it did
  not cut are cached, and those are the full search's, whatever the cap was.
* The hard cap: a VED request waits for its decode until its last chance,
  ``cap - ved_respond_ms`` less the loop's learnt lateness (below), at most. If
  the model thread has not answered by then (queued behind other batches, or a
  search that ran too far past its deadline), a timer resolves the request's
  future with the checkpoint's popularity list (its most frequent training
  targets, ``popular_sids``), with ``fallback: "popular"`` (as are shed jobs);
  the abandoned job is dropped from the queue, or its result discarded. So a
  VED answer never misses its cap by more than the HTTP round trip, and the
  share of such answers says how often the machine was too slow for the cap
  asked (``vstar bench serve`` reports it). The request's cache read and write,
  and its stored-history read when it carries a history of its own to answer
  from, are bounded by its cap too: the reads end at ``ved_store_share`` of
  the time to its last chance, and the cache write gets as long (at most to the
  last chance), so a stalled Redis delays the answer by that share. A stalled
  Redis is then treated as an unavailable one, not waited for, and the search
  keeps the rest of the time; the call given up on runs on to the store's own
  timeout, which opens the store's circuit breaker for the next requests and is
  counted as a store error (``service.store_calls``). A request with only a ``user_id`` needs the stored
  history, and waits for it (the store's own timeout bounds that).
* The loop's lateness: a timer fires when the loop thread gets to it, which on a
  host whose cores other processes hold can be tens of milliseconds late. Every
  request answered at or after its last chance reports how late; the last chance
  is brought forward by the 0.999 quantile of recent reports (expiring after 10 s),
  so the cap holds on the server's clock while the host is busy, at the price
  of fewer model answers meanwhile.

* An answer is a frozen ``Answer`` (``service.answer``); the response cache
  stores it as JSON and the response is built from it.
* The steps that need no server are public and the request path runs them:
  ``plan`` (history -> exclusion set, prompt, fusion's items, decode config),
  ``rank`` and ``wire_items``, with the scheduler's ``decode``. ``vstar
  recommend`` (``service.batch_recommend``) answers a file of users offline
  with them, so its answers are the service's.

The model thread's side (the executor, micro-batching, VED's deadlines, the
anytime fallback and load shedding) is ``service.decode_scheduler``; the
``Recommender`` extends its ``DecodeScheduler`` with the request side, so one
object built at startup still owns both.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from models.beam_search import BeamSearchConfig
from models.checkpoint import LoadedCheckpoint
from models.sid_catalog import sid_to_str
from models.value_head import ValueHead
from models.ved_config import VEDConfig, resolve_budget
from service.answer import Answer, RankedSid, SearchReport
from service.availability import Unavailable, popularity_order
from service.deadline import DeadlineMargin
from service.decode_scheduler import SHED, DecodeJob, DecodePlan, DecodeRow, DecodeScheduler
from service.errors import InvalidInput, NotFound, StoreUnavailable, shorten
from service.history import (
    HistoryEvent,
    excluded_items,
    fully_excluded_sids,
    named_item,
    resolve_entries,
    resolve_exclusions,
    resolve_stored,
)
from service.metrics import ServiceMetrics
from service.response_cache import ResponseCache
from service.schemas import (
    ItemResponse,
    Readiness,
    RecommendedItem,
    RecommendRequest,
    RecommendResponse,
    SearchStats,
)
from service.settings import Settings
from service.store_calls import StoreCalls
from service.stores import Store
from service.user_histories import UserHistories

log = logging.getLogger("service.recommender")


def _expire(future: asyncio.Future[DecodeRow]) -> None:
    """The hard cap's timer: answer from popularity unless the model answered first."""
    if not future.done():
        future.set_result(SHED)


class Recommender(DecodeScheduler):
    """The request side over the decode scheduler: history, exclusion, cache, ranking and the response."""

    def __init__(
        self,
        checkpoint: LoadedCheckpoint,
        value_head: ValueHead,
        settings: Settings,
        store: Store,
        metrics: ServiceMetrics,
    ) -> None:
        super().__init__(checkpoint, value_head, settings, metrics)
        self.model_version = checkpoint.model_version
        self.store = store
        # how late the event loop has recently honoured the hard cap (its timer's answer, or a decode it had to
        # wait for past the cap's last chance): the loop thread runs late when the host is busy, so the last
        # chance is brought forward by this much, learnt like the search margin. A stall of the loop delays
        # every request in flight at once, so the quantile is near the top: one stall in the last 10 s that
        # delayed a handful of answers is enough to keep the next ones clear of the next such stall.
        self.cap_lateness = DeadlineMargin(0.0, quantile=0.999, horizon_s=10.0, window=8192, refresh_s=0.05)
        metrics.track(metrics.ved_cap_lateness, self.cap_lateness.margin_s)  # in force at each scrape, not stale
        self.popular = checkpoint.manifest.get("popular_sids", [])
        self.prior = self._prior_order(self.popular)
        # changes of the unavailable items applied, twice each: odd while one is under way (no answer is cached
        # then, as it may come from a search on the trie before it: apply_unavailable)
        self.availability_changes = 0
        metrics.unavailable_items.set(len(self.unavailable.items))  # set, not tracked: metrics outlive the app
        self.store_calls = StoreCalls(metrics)  # bounded by a VED request's cap, or not (service.store_calls)
        self.users = UserHistories(self.catalog, store, self.store_calls, metrics)  # the /users/{user_id} routes
        self.cache = ResponseCache(
            store, self.store_calls, metrics, settings.cache_ttl_s, self._cache_version(), self.fusion,
            self.catalog.items,
        )  # fmt: skip

    def _cache_version(self) -> str:
        """The unavailable items' digest beside the model version: an answer cached under another set is a miss."""
        return self.model_version + (f"+unavailable:{self.unavailable.digest}" if self.unavailable.digest else "")

    def _prior_order(self, popular: Sequence[Sequence[Any]]) -> DecodeRow:
        """The popularity list over the SIDs still offered (``service.availability.popularity_order``)."""
        return DecodeRow(*popularity_order(self.catalog, popular, self.unavailable.kept_sids))

    async def apply_unavailable(self, new: Unavailable) -> None:
        """``new`` in force, in the order ``service.availability`` gives: the next trie built off the model thread;
        then the ranking's filter, the popularity list, the cache's key and the trie every decode from now on
        searches, at once; the model thread swaps that trie in at the start of its next decode (a beam decode
        between a search's steps included: ``_swap_in_trie``). Until the decodes under way end, answers are not
        cached (``availability_changes`` odd): a search may still run on the trie before."""
        trie = await asyncio.to_thread(self.policy.offered_trie, new.kept_sids)
        self.availability_changes += 1
        try:
            self.unavailable = new
            self.prior = self._prior_order(self.popular)
            self.cache.model_version = self._cache_version()
            self.trie_in_force = trie
            await asyncio.get_running_loop().run_in_executor(self.executor, self._swap_in_trie)
        finally:
            self.availability_changes += 1
        self.metrics.unavailable_reloads.labels("applied").inc()
        self.metrics.unavailable_items.set(len(new.items))
        counts = {"unavailable_items": len(new.items), "unavailable_entries_unknown": new.unknown}
        log.info("unavailable items changed", extra=counts | {"sids_offered": trie.num_sids})  # as the start logs

    def refuse_unavailable(self, error: Exception) -> None:
        self.metrics.unavailable_reloads.labels("refused").inc()
        log.error("%s: the unavailable items in force are kept", error)

    async def close(self) -> None:
        await super().close()
        await self.store_calls.close()
        await self.store.close()

    # ---- requests

    async def recommend(self, req: RecommendRequest, arrival: float | None = None) -> RecommendResponse:
        """``arrival``: ``time.perf_counter()`` when the request reached the server; the clock starts there."""
        started = arrival if arrival is not None else time.perf_counter()
        try:
            response = await self._recommend(req, started)
        except (InvalidInput, NotFound, StoreUnavailable) as e:
            self.metrics.requests.labels(req.mode, type(e).__name__).inc()
            raise
        except asyncio.CancelledError:  # the client hung up (``service.routes.unless_hung_up``) or the server stops
            self.metrics.requests.labels(req.mode, "cancelled").inc()
            raise
        self.metrics.requests.labels(req.mode, "ok").inc()
        self.metrics.latency.labels(req.mode).observe(time.perf_counter() - started)
        return response

    async def _recommend(self, req: RecommendRequest, started: float) -> RecommendResponse:
        # a VED request's store reads end at a share of its time to its last chance, and its cache write gets as
        # long (module doc): a stalled Redis cannot hold it, nor take the time its search needs
        answer_by = self._answer_by(req, started) if req.mode == "ved" else None
        share_s = 0.0 if answer_by is None else self.settings.ved_store_share * (answer_by - started)
        reads_by = None if answer_by is None else started + share_s
        # the request's own exclusions first: a bad entry is a 422 whatever the store does
        requested = resolve_exclusions(self.catalog, req.exclude_items) if req.exclude_items else frozenset()
        events, stored_state = await self._history_for(req, reads_by)
        changes = self.availability_changes  # before the key: one taken under a list since changed is not written
        plan = self.plan(req, events, requested)
        key = self.cache.key(req, plan)  # None: the cache is off
        answer = await self.cache.get(key, reads_by) if key is not None else None
        cached = answer is not None
        if answer is None:
            answer = await self._search(req, plan, started, answer_by)
            if key is not None and not answer.cap_hit and changes == self.availability_changes and changes % 2 == 0:
                # as long as the reads had, up to the last chance
                write_by = None if answer_by is None else min(answer_by, time.perf_counter() + share_s)
                await self.cache.set(key, answer, write_by)
        return RecommendResponse(
            items=self.wire_items(answer.items),
            mode=req.mode,
            cap_hit=answer.cap_hit,
            search=SearchStats(**vars(answer.search)) if answer.search is not None else None,
            model_version=self.model_version,
            server_time_ms=round((time.perf_counter() - started) * 1000, 3),
            history_length=len(events),
            history_truncated=len(events) > self.max_prompt_history,
            stored_history=stored_state,
            cached=cached,
        )

    def plan(
        self, req: RecommendRequest, events: list[HistoryEvent], requested: frozenset[int] | None = None
    ) -> DecodePlan:
        """What ``req`` over the resolved history ``events`` (stored and given, oldest first) asks the model for;
        ``InvalidInput`` for a VED budget too small for its k, or an ``exclude_items`` entry that can name no item.
        ``requested``: ``req.exclude_items`` already resolved (``resolve_exclusions``), or None to resolve them here."""
        excluded = excluded_items(self.catalog, events) if req.excludes_history(self.settings) else frozenset()
        if requested is None and req.exclude_items:
            requested = resolve_exclusions(self.catalog, req.exclude_items)
        if requested:
            excluded |= requested
        history = tuple(e.sid for e in events[-self.max_prompt_history :])
        return DecodePlan(
            self._decode_config(req, excluded), DecodeJob(history, items=self._fused_items(events)), excluded
        )

    def wire_items(self, ranked: Sequence[RankedSid]) -> list[RecommendedItem]:
        """An answer's items as the response gives them. External ids come from the loaded catalog, not the
        cache: a cached answer's item ids are this checkpoint's (its key holds the model version), and entries
        keep their layout (CACHE_FORMAT); field by field: ``dataclasses.asdict`` deep-copies every list, which
        took 60% of a cache hit's time."""
        return [
            RecommendedItem(
                sid=it.sid,
                item_ids=it.item_ids,
                titles=it.titles,
                score=it.score,
                external_ids=self.catalog.external_ids_of(it.item_ids),
            )
            for it in ranked
        ]

    def _answer_by(self, req: RecommendRequest, started: float) -> float:
        """A VED request's last chance (``time.perf_counter()``): its cap less the reserve to respond and the
        loop's learnt lateness (module doc)."""
        last_chance_ms = req.cap_ms(self.settings) - self.settings.ved_respond_ms - 1000 * self.cap_lateness.margin_s()
        return started + last_chance_ms / 1000

    def _decode_config(self, req: RecommendRequest, excluded: frozenset[int]) -> BeamSearchConfig | VEDConfig:
        """The request's decoder config, normalised: beam no wider than the SIDs offered, VED with its budget
        resolved (VED's own for its k when the request gives none), so equal searches share a batch and a cache
        entry; a budget below VED's least is ``InvalidInput``."""
        extra = fully_excluded_sids(self.catalog, excluded, self.unavailable.offered_of)
        config = req.to_decode_config(extra, self.ved_settings)
        if isinstance(config, BeamSearchConfig):
            return BeamSearchConfig(min(config.num_beams, self.trie_in_force.num_sids))
        try:
            return replace(config, budget=resolve_budget(config, self.catalog.depth))
        except ValueError as e:
            extra = config.num_candidates - req.k  # the SIDs exclusion may remove: searched for on top of k
            sids = f"{extra} SID{'s' if extra > 1 else ''} its exclusions leave without an item"
            because = f"k={req.k} plus the {sids}" if extra else f"k={req.k}"
            raise InvalidInput("budget", f"{e} ({because})") from None

    async def _search(self, req: RecommendRequest, plan: DecodePlan, started: float, answer_by: float | None) -> Answer:
        config, excluded = plan.config, plan.excluded
        if isinstance(config, BeamSearchConfig):
            row = await self.batcher.submit(config, plan.job)
            return Answer(self.rank(row, excluded, req.k), cap_hit=False, search=None)
        assert answer_by is not None
        # the search's overrun must end before the hard cap's last chance, not before the cap itself
        deadline = self.deadline_margin.deadline(started, (answer_by - started) * 1000)
        # the hard cap: a timer that resolves the request's own future with SHED, so the answer is one
        # loop turn away when it fires (asyncio.wait_for would first cancel a task and wait for it)
        future = self.batcher.enqueue(config, replace(plan.job, deadline=deadline, answer_by=answer_by))
        due = max(answer_by, time.perf_counter())  # when the timer is set to fire
        timer = asyncio.get_running_loop().call_later(due - time.perf_counter(), _expire, future)
        try:
            row = await future
        finally:
            timer.cancel()
        late = time.perf_counter() - due  # the loop's lateness alone: never counts the reserve it feeds
        if late >= 0:
            self.cap_lateness.report(late)
        if row.shed:  # shed by the model thread, or the hard cap's timer: popularity, at once
            return self._prior_answer(excluded, req.k)
        stats = row.stats
        assert stats is not None
        items = self.rank(row, excluded, req.k)
        self.metrics.ved_tokens.observe(stats.tokens_spent)
        if stats.cap_hit:
            self.metrics.cap_hits.inc()
        if row.fallback:
            self.metrics.ved_fallbacks.labels("initial_beam").inc()
        fallback = "initial_beam" if row.fallback else None
        search = SearchReport(stats.tokens_spent, stats.nodes, stats.max_depth, stats.iterations, fallback)
        return Answer(items, stats.cap_hit, search)

    def _prior_answer(self, excluded: frozenset[int], k: int) -> Answer:
        """The last resort of the hard cap: the most popular training targets, no model work at all."""
        self.metrics.cap_hits.inc()
        self.metrics.ved_fallbacks.labels("popular").inc()
        self.metrics.ved_tokens.observe(0)
        search = SearchReport(tokens_spent=0, nodes=0, max_depth=0, iterations=0, fallback="popular")
        return Answer(self.rank(self.prior, excluded, k), cap_hit=True, search=search)

    def rank(self, row: DecodeRow, excluded: frozenset[int], k: int) -> list[RankedSid]:
        """A decode's row as an answer's items: its SIDs in order, each with its items less ``excluded`` and the
        unavailable ones (``service.availability``), a SID left with none dropped, cut to ``k``."""
        out: list[RankedSid] = []
        unavailable = self.unavailable.items
        for idx, score in zip(row.sid_index, row.scores, strict=True):
            if idx < 0 or not math.isfinite(score):
                continue
            items = [i for i in self.catalog.items_of_sid[idx] if i not in excluded and i not in unavailable]
            if not items:
                continue
            sid = sid_to_str(self.catalog.sids[idx])
            out.append(RankedSid(sid, items, [self.catalog.items[i].title for i in items], score))
            if len(out) == k:
                break
        return out

    async def _history_for(self, req: RecommendRequest, by: float | None) -> tuple[list[HistoryEvent], str]:
        """Stored history (if a user is named) followed by the request's; and how the store answered."""
        given = resolve_entries(self.catalog, req.history or [], "history")
        if req.user_id is None:
            if not given:
                raise InvalidInput("history", "give a non-empty history, or a user_id with a stored history")
            return given, "none"
        # bounded by the cap only when the request can be answered without the stored history: without a
        # history of its own it needs the store's answer, and a short cap must not turn a healthy store into a 503
        try:
            raw = await self.store_calls.within("read_history", self.store.history(req.user_id), by if given else None)
            stored, skipped = resolve_stored(self.catalog, raw)
        except StoreUnavailable:
            if not given:
                raise StoreUnavailable(
                    "user_id: the history store is unavailable; send the history in the request"
                ) from None
            return given, "unavailable"
        if skipped:
            log.warning("stored history has entries the catalog does not know", extra={"skipped": skipped})
        return self.stored_then_given(req.user_id, stored, given), "used" if stored else "none"

    @staticmethod
    def stored_then_given(user_id: str, stored: list[HistoryEvent], given: list[HistoryEvent]) -> list[HistoryEvent]:
        """A named user's history: the stored events (``resolve_stored``'s) followed by the request's own;
        ``NotFound`` when neither has any. ``vstar recommend --stored-history`` combines them here too."""
        if not stored and not given:
            raise NotFound(f"user_id: no stored history for user {user_id!r} and the request has no history")
        return stored + given

    def _fused_items(self, events: list[HistoryEvent]) -> tuple[int, ...]:
        """What the decoders' shallow fusion reads of the history: its last items (``named_item``), as many as the
        transition counts' window; none without fusion."""
        if self.fusion is None:
            return ()
        return tuple(named_item(self.catalog, e) for e in events[-self.fusion.counts.window :])

    def item(self, item_id: int) -> ItemResponse:
        item = self.catalog.items.get(item_id)
        if item is None:
            raise NotFound(f"item_id: unknown item {item_id}")
        external_id = self.catalog.external_id_of(item.item_id)
        return ItemResponse(item_id=item.item_id, sid=sid_to_str(item.sid), title=item.title, external_id=external_id)

    def item_by_external_id(self, external_id: str) -> ItemResponse:
        item_id = self.catalog.item_of_external_id.get(external_id)
        if item_id is None:
            why = "" if self.catalog.external_ids is not None else " (this checkpoint's catalog has no external ids)"
            raise NotFound(f"external_id: unknown external id {shorten(repr(external_id))}{why}")
        return self.item(item_id)

    async def readiness(self) -> Readiness:
        if self.store.kind == "redis":
            redis = "ok" if await self.store.ping() else "unreachable"
        else:
            redis = "not_configured"
        status = "ready" if redis != "unreachable" else "degraded"
        return Readiness(status=status, model="loaded", model_version=self.model_version, redis=redis)
