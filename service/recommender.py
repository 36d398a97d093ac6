"""The recommender: the one object that does the service's work, built once at startup.

A request goes: history (stored + given, resolved against the catalog) ->
exclusion set -> response cache -> decode (micro-batched, on the model thread)
-> SIDs expanded to items, excluded items dropped, cut to k -> response.

Design decisions:

* The decoders work on SIDs; one SID can name several items, so each result
  row is a SID with all its items. ``exclude_history`` removes the user's items
  from those lists and drops a SID whose items are all excluded; the decode asks
  for ``k`` plus that many extra beams, so k items still come back when k exist.
* The response cache key is the model version plus the normalised request: the
  SIDs the prompt actually sees (the last ``max_history``), the exclusion set
  when exclusion is on, ``k``, the mode and, for VED only, budget and cap. A
  user's new event changes the key, so the cache never needs invalidating.
* All model work runs on one executor thread, so torch owns the cores and
  the event loop keeps answering health checks and cache hits meanwhile. That
  thread runs at a lower priority (``model_thread_nice``): on a busy CPU the
  loop, which must answer at the hard cap, wins the cores over model work.
* VED is an anytime search: each request's deadline is its arrival plus its
  cap, less a margin learnt from how far past their deadlines earlier searches
  finished (``service.deadline``). Concurrent VED
  requests with the same k and budget share one batched search, which stops at
  the earliest of their deadlines. Results that hit the cap are not cached: a
  later, unhurried request deserves the full search.
* The anytime fallback: VED's initial tree (a beam with every node, complete
  SIDs included, run through the backbone and the value head) costs 2-2.5x a
  plain beam search, so a request that could not see it finish is answered by
  the initial beam alone: constrained beam search of width max(k + extra,
  init_beams), ranked by log-prob, ``cap_hit`` true, ``fallback:
  "initial_beam"`` in its stats. The decision is taken per job when the model
  thread picks the batch up (queueing counts): time left below the learnt cost
  of the initial tree (``BatchCost``, timed at warm-up) means fallback.
  A batch's fallbacks are decoded first, their deadlines being the nearest.
* Load shedding: before that, the model thread keeps only the jobs that can
  still be answered before their hard cap (below): the most jobs whose time
  left all covers the initial beam's learnt cost for that many prompts, the
  least urgent first. The others are not decoded at all and are answered from
  popularity at once, so an overloaded model spends its time on answers that
  will be used instead of on work the hard cap throws away.
* The hard cap: a VED request waits for its decode until its last chance,
  ``cap - ved_respond_ms`` less the loop's learnt lateness (below), at most. If
  the model thread has not answered by then (queued behind other batches, or a
  search that ran too far past its deadline), a timer resolves the request's
  future with the checkpoint's popularity list (its most frequent training
  targets, ``popular_sids``), with ``fallback: "popular"`` (as are shed jobs);
  the abandoned job is dropped from the queue, or its result discarded. So a
  VED answer never misses its cap by more than the HTTP round trip, and the
  share of such answers says how often the machine was too slow for the cap
  asked (``vstar bench serve`` reports it).
* The loop's lateness: a timer fires when the loop thread gets to it, which on a
  host whose cores other processes hold can be tens of milliseconds late. Every
  request answered at or after its last chance reports how late; the last chance
  is brought forward by the 0.999 quantile of recent reports (expiring after 10 s),
  so the cap holds on the server's clock while the host is busy, at the price
  of fewer model answers meanwhile.
* Overruns are reported to the deadline margin by the model thread, when the
  search ends, so the margin learns from searches whose request the hard cap
  already answered.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from models.beam_search import BeamSearchConfig, beam_search
from models.checkpoint import CheckpointError, LoadedCheckpoint
from models.sid_catalog import Sid, parse_sid, sid_to_str
from models.value_head import ValueHead
from models.ved import VEDConfig, VEDStats, resolve_budget, ved_search
from service.batcher import MicroBatcher
from service.deadline import BatchCost, DeadlineMargin
from service.errors import InvalidInput, NotFound, StoreUnavailable
from service.history import HistoryEvent, excluded_items, fully_excluded_sids, resolve_entries, resolve_stored
from service.metrics import ServiceMetrics
from service.schemas import (
    EventsResponse,
    HistoryItem,
    HistoryResponse,
    ItemResponse,
    Readiness,
    RecommendedItem,
    RecommendRequest,
    RecommendResponse,
)
from service.settings import Settings
from service.stores import Store, WriteOutcomeUnknown

log = logging.getLogger("service.recommender")


@dataclass(frozen=True)
class DecodeJob:
    history: tuple[Sid, ...]  # the SIDs the prompt sees, oldest first
    deadline: float | None = None  # VED: time.perf_counter() value to stop by
    answer_by: float | None = None  # VED: the hard cap; a job that cannot be decoded by then is shed


@dataclass(frozen=True)
class DecodeRow:
    sid_index: list[int]  # ranked catalog SID indices, -1 where no valid SID
    scores: list[float]
    stats: VEDStats | None = None  # VED only
    fallback: bool = False  # VED: answered by the initial beam, not by the search
    shed: bool = False  # VED: not decoded, it could not be answered before its hard cap


SHED = DecodeRow([], [], shed=True)


def lower_priority(nice: int) -> None:
    """Run in the model thread: raise its niceness by ``nice`` (Linux schedules threads one by one).

    The event loop answers VED requests at their hard cap, the model thread only makes answers better, so when
    both want a busy CPU the loop should win: measured with ``vstar bench serve`` beside training jobs on two
    cores, 32 clients at cap 50 ms, the hard cap's answers came up to 40-46 ms after their timer at nice 0 and
    up to 16-25 ms at nice 10.
    """
    if nice and sys.platform == "linux":
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + nice, 19))


def _expire(future: asyncio.Future[DecodeRow]) -> None:
    """The hard cap's timer: answer from popularity unless the model answered first."""
    if not future.done():
        future.set_result(SHED)


class Recommender:
    def __init__(
        self,
        checkpoint: LoadedCheckpoint,
        value_head: ValueHead,
        settings: Settings,
        store: Store,
        metrics: ServiceMetrics,
    ) -> None:
        self.policy = checkpoint.policy
        self.checkpoint_path = checkpoint.path
        self.value_head = value_head
        self.catalog = checkpoint.policy.catalog
        self.model_version = checkpoint.model_version
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.max_prompt_history = self.policy.prompt.max_history
        self.deadline_margin = DeadlineMargin(settings.ved_margin_ms / 1000)
        # how late the event loop has recently honoured the hard cap (its timer's answer, or a decode it had to
        # wait for past the cap's last chance): the loop thread runs late when the host is busy, so the last
        # chance is brought forward by this much, learnt like the search margin. A stall of the loop delays
        # every request in flight at once, so the quantile is near the top: one stall in the last 10 s that
        # delayed a handful of answers is enough to keep the next ones clear of the next such stall.
        self.cap_lateness = DeadlineMargin(0.0, quantile=0.999, horizon_s=10.0, window=8192, refresh_s=0.05)
        self.init_cost = BatchCost(settings.ved_init_cost_ms / 1000)  # VED's initial tree
        # the fallback's initial beam; its median, not a high quantile: a job is shed only when it would
        # probably miss its cap, and the hard cap still answers the ones that do
        self.beam_cost = BatchCost(settings.ved_init_cost_ms / 1000, quantile=0.5, min_reports=1)
        self.prior = self._prior_order(checkpoint.manifest.get("popular_sids", []))
        self.executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="vstar-model",
            initializer=lower_priority,
            initargs=(settings.model_thread_nice,),
        )
        self.batcher: MicroBatcher[DecodeJob, DecodeRow] = MicroBatcher(
            self._decode, self.executor, settings.batch_max_size, settings.batch_max_wait_ms / 1000, self._on_batch
        )

    def _prior_order(self, popular: Sequence[Sequence[Any]]) -> DecodeRow:
        """Every catalog SID index with a popularity log-probability: the checkpoint's training-target
        counts (``popular_sids``), add-half smoothed over the whole catalog; most popular first."""
        counts: dict[int, int] = {}
        for sid, count in popular:
            idx = self.catalog.sid_index.get(tuple(parse_sid(sid)))
            if idx is not None:
                counts[idx] = counts.get(idx, 0) + int(count)
        n = len(self.catalog.sids)
        total = sum(counts.values()) + 0.5 * n
        order = sorted(range(n), key=lambda i: (-counts.get(i, 0), i))
        return DecodeRow(order, [math.log((counts.get(i, 0) + 0.5) / total) for i in order])

    # ---- lifecycle

    def warmup(self) -> None:
        """Decode one request, then time VED's fallbacks, on the model thread (at its priority), before serving:
        a checkpoint that cannot decode fails the start."""
        self.executor.submit(self._warmup).result()

    def _warmup(self) -> None:
        first = self.catalog.sids[0]
        for config in (BeamSearchConfig(self.settings.default_k), VEDConfig(num_candidates=self.settings.default_k)):
            rows = self._decode(config, [DecodeJob((first,))])
            if rows[0].sid_index[0] < 0:  # not an assert: python -O would drop it and serve a model that cannot
                raise CheckpointError(
                    f"checkpoint {self.checkpoint_path}: warm-up decode ({type(config).__name__}) returned no valid SID"
                )
        self._time_ved_fallbacks()

    def _time_ved_fallbacks(self) -> None:
        """Time VED's initial tree (a passed deadline stops it there) and the initial beam per batch bucket,
        on the longest prompts; the least of three runs is the decode's own cost (one-off allocations and
        load spikes are not)."""
        config = VEDConfig(num_candidates=self.settings.default_k, deadline=0.0)
        history = tuple(self.catalog.sids[: self.max_prompt_history])
        batch = 1
        while True:
            ids, mask = self.policy.encode_prompts([list(history)] * batch)
            tree, beam = [], []
            for _ in range(3):
                started = time.perf_counter()
                ved_search(self.policy.model, self.value_head, self.policy.trie, ids, mask, config)
                tree.append(time.perf_counter() - started)
                started = time.perf_counter()
                self._initial_beam(replace(config, deadline=None), [DecodeJob(history)] * batch, report=False)
                beam.append(time.perf_counter() - started)
            self.init_cost.set_baseline(batch, min(tree))
            self.beam_cost.set_baseline(batch, min(beam))
            if batch >= self.settings.batch_max_size:
                return
            batch *= 2

    def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        await self.batcher.stop()
        self.executor.shutdown(wait=True)
        await self.store.close()

    # ---- model thread

    def _decode(self, key: Hashable, jobs: Sequence[DecodeJob]) -> list[DecodeRow]:
        if isinstance(key, BeamSearchConfig):
            return self._beam(key, jobs)
        assert isinstance(key, VEDConfig) and key.deadline is None
        now = time.perf_counter()
        kept = self._admit(jobs, now)
        cost = self.init_cost.cost_s(sum(kept))
        late = [j.deadline is not None and j.deadline - now < cost for j in jobs]
        fallen = [j for j, k, x in zip(jobs, kept, late, strict=True) if k and x]
        searched = [j for j, k, x in zip(jobs, kept, late, strict=True) if k and not x]
        beam_rows = iter(self._initial_beam(key, fallen) if fallen else [])  # first: their deadlines are nearest
        ved_rows = iter(self._ved(key, searched) if searched else [])
        return [SHED if not k else next(beam_rows) if x else next(ved_rows) for k, x in zip(kept, late, strict=True)]

    def _admit(self, jobs: Sequence[DecodeJob], now: float) -> list[bool]:
        """Load shedding: keep the most jobs m such that the m with the most time left before their hard cap
        all have at least the initial beam's cost for m prompts left; the rest are not decoded."""
        left = [math.inf if j.answer_by is None else j.answer_by - now for j in jobs]
        order = sorted(range(len(jobs)), key=lambda i: -left[i])
        m = len(jobs)
        while m > 0 and left[order[m - 1]] < self.beam_cost.cost_s(m):
            m -= 1
        kept = set(order[:m])
        return [i in kept for i in range(len(jobs))]

    def _beam(self, config: BeamSearchConfig, jobs: Sequence[DecodeJob]) -> list[DecodeRow]:
        ids, mask = self.policy.encode_prompts([list(j.history) for j in jobs])
        res = beam_search(self.policy.model, self.policy.trie, ids, mask, config)
        return [DecodeRow(s, sc) for s, sc in zip(res.sid_index.tolist(), res.scores.tolist(), strict=True)]

    def _ved(self, config: VEDConfig, jobs: Sequence[DecodeJob]) -> list[DecodeRow]:
        deadlines = [j.deadline for j in jobs if j.deadline is not None]
        config = replace(config, deadline=min(deadlines, default=None))
        ids, mask = self.policy.encode_prompts([list(j.history) for j in jobs])
        started = time.perf_counter()
        out = ved_search(self.policy.model, self.value_head, self.policy.trie, ids, mask, config)
        finished = time.perf_counter()
        if all(st.cap_hit and st.iterations == 0 for st in out.stats):  # it stopped right after its initial tree
            self.init_cost.report(len(jobs), finished - started)
        elif config.deadline is not None and any(st.cap_hit and st.iterations > 0 for st in out.stats):
            # the loop ran and the deadline stopped it: learn how far past the deadline it finished. Reported
            # here, not by the request, so it is learnt even when the hard cap answered that request already.
            self.deadline_margin.report(finished - config.deadline)
            self.metrics.ved_margin.set(self.deadline_margin.margin_s())
        rows = zip(out.decode.sid_index.tolist(), out.decode.scores.tolist(), out.stats, strict=True)
        return [DecodeRow(s, sc, st) for s, sc, st in rows]

    def _initial_beam(self, config: VEDConfig, jobs: Sequence[DecodeJob], report: bool = True) -> list[DecodeRow]:
        """The anytime fallback: VED's initial beam without the tree, with stats that say what was spent."""
        trie = self.policy.trie
        width = min(max(config.num_candidates, config.init_beams), len(self.catalog.sids))
        kept = [min(width, int((trie.node_depth == d).sum())) for d in range(1, trie.depth + 1)]  # beams per level
        started = time.perf_counter()
        rows = self._beam(BeamSearchConfig(width), jobs)
        if report:
            self.beam_cost.report(len(jobs), time.perf_counter() - started)
        stats = VEDStats(
            tokens_spent=sum(kept[:-1]),
            nodes=1 + sum(kept),
            max_depth=trie.depth,
            iterations=0,
            cap_hit=True,
            budget=resolve_budget(config, trie.depth),
            init_tokens=sum(kept[:-1]),
            leaves=kept[-1],
            stop_reason="deadline",
        )
        return [replace(row, stats=replace(stats), fallback=True) for row in rows]

    def _on_batch(self, key: Hashable, size: int) -> None:
        if isinstance(key, BeamSearchConfig):
            self.metrics.batch_size.observe(size)

    # ---- requests

    async def recommend(self, req: RecommendRequest, arrival: float | None = None) -> RecommendResponse:
        """``arrival``: ``time.perf_counter()`` when the request reached the server; the clock starts there."""
        started = arrival if arrival is not None else time.perf_counter()
        try:
            response = await self._recommend(req, started)
        except (InvalidInput, NotFound, StoreUnavailable) as e:
            self.metrics.requests.labels(req.mode, type(e).__name__).inc()
            raise
        self.metrics.requests.labels(req.mode, "ok").inc()
        self.metrics.latency.labels(req.mode).observe(time.perf_counter() - started)
        return response

    async def _recommend(self, req: RecommendRequest, started: float) -> RecommendResponse:
        events, stored_state = await self._history_for(req)
        excluded = excluded_items(self.catalog, events) if req.excludes_history(self.settings) else frozenset()
        seen = events[-self.max_prompt_history :]
        key = self._cache_key(req, seen, excluded) if self.settings.cache_ttl_s else None  # None: cache off
        body = await self._cache_get(key) if key is not None else None
        cached = body is not None
        if body is None:
            body = await self._search(req, seen, excluded, started)
            if key is not None and not body["cap_hit"]:
                await self._cache_set(key, body)
        return RecommendResponse(
            items=[RecommendedItem(**it) for it in body["items"]],
            mode=req.mode,
            cap_hit=body["cap_hit"],
            search=body["search"],
            model_version=self.model_version,
            server_time_ms=round((time.perf_counter() - started) * 1000, 3),
            history_length=len(events),
            history_truncated=len(events) > self.max_prompt_history,
            stored_history=stored_state,
            cached=cached,
        )

    async def _search(
        self, req: RecommendRequest, seen: list[HistoryEvent], excluded: frozenset[int], started: float
    ) -> dict[str, Any]:
        config = req.to_decode_config(fully_excluded_sids(self.catalog, excluded))
        history = tuple(e.sid for e in seen)
        if isinstance(config, BeamSearchConfig):
            config = BeamSearchConfig(min(config.num_beams, len(self.catalog.sids)))
            row = await self.batcher.submit(config, DecodeJob(history))
            return {"items": self._rank(row, excluded, req.k), "cap_hit": False, "search": None}
        try:
            resolve_budget(config, self.catalog.depth)
        except ValueError as e:
            raise InvalidInput("budget", f"{e} (k={req.k})") from None
        cap_ms = req.cap_ms(self.settings)
        last_chance_ms = cap_ms - self.settings.ved_respond_ms - 1000 * self.cap_lateness.margin_s()
        answer_by = started + last_chance_ms / 1000
        # the search's overrun must end before the hard cap's last chance, not before the cap itself
        deadline = self.deadline_margin.deadline(started, last_chance_ms)
        # the hard cap: a timer that resolves the request's own future with SHED, so the answer is one
        # loop turn away when it fires (asyncio.wait_for would first cancel a task and wait for it)
        future = self.batcher.enqueue(config, DecodeJob(history, deadline, answer_by))
        due = max(answer_by, time.perf_counter())  # when the timer is set to fire
        timer = asyncio.get_running_loop().call_later(due - time.perf_counter(), _expire, future)
        try:
            row = await future
        finally:
            timer.cancel()
        late = time.perf_counter() - due  # the loop's lateness alone: never counts the reserve it feeds
        if late >= 0:
            self.cap_lateness.report(late)
            self.metrics.ved_cap_lateness.set(self.cap_lateness.margin_s())
        if row.shed:  # shed by the model thread, or the hard cap's timer: popularity, at once
            return self._prior_answer(excluded, req.k)
        stats = row.stats
        assert stats is not None
        items = self._rank(row, excluded, req.k)
        self.metrics.ved_tokens.observe(stats.tokens_spent)
        if stats.cap_hit:
            self.metrics.cap_hits.inc()
        if row.fallback:
            self.metrics.ved_fallbacks.inc()
        search = {
            "tokens_spent": stats.tokens_spent,
            "nodes": stats.nodes,
            "max_depth": stats.max_depth,
            "iterations": stats.iterations,
            "fallback": "initial_beam" if row.fallback else None,
        }
        return {"items": items, "cap_hit": stats.cap_hit, "search": search}

    def _prior_answer(self, excluded: frozenset[int], k: int) -> dict[str, Any]:
        """The last resort of the hard cap: the most popular training targets, no model work at all."""
        self.metrics.cap_hits.inc()
        self.metrics.ved_fallbacks.inc()
        self.metrics.ved_tokens.observe(0)
        search = {"tokens_spent": 0, "nodes": 0, "max_depth": 0, "iterations": 0, "fallback": "popular"}
        return {"items": self._rank(self.prior, excluded, k), "cap_hit": True, "search": search}

    def _rank(self, row: DecodeRow, excluded: frozenset[int], k: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for idx, score in zip(row.sid_index, row.scores, strict=True):
            if idx < 0 or not math.isfinite(score):
                continue
            items = [i for i in self.catalog.items_of_sid[idx] if i not in excluded]
            if not items:
                continue
            sid = sid_to_str(self.catalog.sids[idx])
            out.append(
                {"sid": sid, "item_ids": items, "titles": [self.catalog.items[i].title for i in items], "score": score}
            )
            if len(out) == k:
                break
        return out

    async def _history_for(self, req: RecommendRequest) -> tuple[list[HistoryEvent], str]:
        """Stored history (if a user is named) followed by the request's; and how the store answered."""
        given = resolve_entries(self.catalog, req.history or [], "history")
        if req.user_id is None:
            if not given:
                raise InvalidInput("history", "give a non-empty history, or a user_id with a stored history")
            return given, "none"
        try:
            stored, skipped = resolve_stored(self.catalog, await self.store.history(req.user_id))
        except StoreUnavailable:
            self.metrics.store_errors.labels("read_history").inc()
            if not given:
                raise StoreUnavailable(
                    "user_id: the history store is unavailable; send the history in the request"
                ) from None
            return given, "unavailable"
        if skipped:
            log.warning("stored history has entries the catalog does not know", extra={"skipped": skipped})
        if not stored and not given:
            raise NotFound(f"user_id: no stored history for user {req.user_id!r} and the request has no history")
        return stored + given, "used" if stored else "none"

    def _cache_key(self, req: RecommendRequest, seen: list[HistoryEvent], excluded: frozenset[int]) -> str:
        norm: dict[str, Any] = {
            "v": self.model_version,
            "h": [sid_to_str(e.sid) for e in seen],
            "x": sorted(excluded),
            "k": req.k,
            "m": req.mode,
        }
        if req.mode == "ved":
            norm |= {"b": req.budget, "l": req.cap_ms(self.settings)}
        return hashlib.sha256(json.dumps(norm, separators=(",", ":")).encode()).hexdigest()

    async def _cache_get(self, key: str) -> dict[str, Any] | None:
        try:
            raw = await self.store.cache_get(key)
        except StoreUnavailable:
            self.metrics.store_errors.labels("read_cache").inc()
            raw = None
        self.metrics.cache.labels("hit" if raw is not None else "miss").inc()
        return None if raw is None else json.loads(raw)

    async def _cache_set(self, key: str, body: dict[str, Any]) -> None:
        try:
            await self.store.cache_set(key, json.dumps(body).encode(), self.settings.cache_ttl_s)
        except StoreUnavailable:
            self.metrics.store_errors.labels("write_cache").inc()

    async def append_events(
        self, user_id: str, entries: Sequence[int | str], idempotency_key: str | None = None
    ) -> tuple[EventsResponse, bool]:
        """The response, and whether it replays an earlier write under the same ``idempotency_key``."""
        events = resolve_entries(self.catalog, entries, "items")
        try:
            done = await self.store.append(user_id, [e.stored() for e in events], idempotency_key)
        except WriteOutcomeUnknown:
            self.metrics.store_errors.labels("append_history").inc()
            retry = (
                "retry with the same Idempotency-Key" if idempotency_key else "send an Idempotency-Key to retry safely"
            )
            raise StoreUnavailable(
                f"the history store did not confirm the write; the events may have been stored: {retry}"
            ) from None
        except StoreUnavailable:
            self.metrics.store_errors.labels("append_history").inc()
            raise StoreUnavailable("the history store is unavailable; the events were not stored, retry") from None
        return EventsResponse(
            user_id=user_id, appended=done.appended, history_length=done.history_length
        ), done.replayed

    async def history(self, user_id: str) -> HistoryResponse:
        try:
            stored, _ = resolve_stored(self.catalog, await self.store.history(user_id))
        except StoreUnavailable:
            self.metrics.store_errors.labels("read_history").inc()
            raise
        if not stored:
            raise NotFound(f"user_id: no stored history for user {user_id!r}")
        items = [
            HistoryItem(
                item_id=e.item_id,
                sid=sid_to_str(e.sid),
                title=self.catalog.items[e.item_id].title if e.item_id is not None else None,
            )
            for e in stored
        ]
        return HistoryResponse(user_id=user_id, history=items)

    def item(self, item_id: int) -> ItemResponse:
        item = self.catalog.items.get(item_id)
        if item is None:
            raise NotFound(f"item_id: unknown item {item_id}")
        return ItemResponse(item_id=item.item_id, sid=sid_to_str(item.sid), title=item.title)

    async def readiness(self) -> Readiness:
        if self.store.kind == "redis":
            redis = "ok" if await self.store.ping() else "unreachable"
        else:
            redis = "not_configured"
        status = "ready" if redis != "unreachable" else "degraded"
        return Readiness(status=status, model="loaded", model_version=self.model_version, redis=redis)
