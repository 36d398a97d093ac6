"""The decode scheduler: the model thread's side of the recommender.

Requests become ``DecodeJob``s; the micro-batcher groups them by decode
configuration and this module decodes each group on the one model thread and
answers one ``DecodeRow`` per job. ``service.recommender`` (the request side:
history, cache, ranking, the response, the hard cap) builds on it.

Design decisions:

* All model work runs on one executor thread, so torch owns the cores and
  the event loop keeps answering health checks and cache hits meanwhile. That
  thread runs at a lower priority (``model_thread_nice``): on a busy CPU the
  loop, which must answer at the hard cap, wins the cores over model work.
* VED is an anytime search: each request's deadline is its last chance (its
  arrival plus its cap, less the reserve to respond and the loop's learnt
  lateness), less a margin learnt from how far past their deadlines earlier
  searches finished (``service.deadline``). Concurrent VED
  requests with the same k and budget share one batched search, which stops at
  the earliest of their deadlines. Results that hit the cap are not cached: a
  later, unhurried request deserves the full search. Searching a long-cap
  request after the short ones, to its own deadline, was tried and measured
  worse: the demo's V-STAR checkpoint, k 10, two closed-loop clients at 150 ms
  and two at 1,000 ms for 20 s on 2 CPU cores gave 744 answers, all searched to
  the budget, when they share; split, 511, and 49% of the 150 ms ones came from
  popularity while they queued behind a longer search (one run each, httpx
  clients against ``vstar serve``; commit c799043 has the figures per cap).
* VED searches with the VED settings the checkpoint was trained with
  (``models.ved_config.checkpoint_ved_config``, as ``vstar eval --decoder ved``),
  less RL's exploratory slots; the budget is the request's, or VED's own for
  its k (never one stored with the checkpoint: it could be too small for k).
* The anytime fallback: VED's initial tree (a beam over the SID prefixes, each
  run through the backbone and the value head) costs more than a
  plain beam search, so a request that could not see it finish is answered by
  the initial beam alone: constrained beam search of width max(k + extra,
  init_beams), ranked by log-prob, ``cap_hit`` true, ``fallback:
  "initial_beam"`` in its stats. The decision is taken per job when the model
  thread picks the batch up (queueing counts): time left below the learnt cost
  of the initial tree (``BatchCost``, timed at warm-up) means fallback.
  A batch's fallbacks are decoded first, their deadlines being the nearest,
  and answered then (``MicroBatcher.answer_now``), not after the batch's search.
* Both decoders are fused with the checkpoint's transition counts at its
  chosen weight (manifest ``fusion``; ``fusion_weight`` overrides it as
  ``vstar eval --fusion-weight`` does), as ``vstar eval`` decodes by default:
  the ranking the checkpoint was selected and measured with. VED adds the
  bonus where ``models.ved`` does (its initial tree and its returned set's
  ranking), and so does its initial-beam fallback, a beam search.
* Load shedding: before that, the model thread keeps only the jobs that can
  still be answered before their hard cap (``service.recommender``): the most jobs whose time
  left all covers the initial beam's learnt cost for that many prompts, the
  least urgent first. The others are not decoded at all and are answered from
  popularity at once, so an overloaded model spends its time on answers that
  will be used instead of on work the hard cap throws away. Costing each part
  as it runs instead (a search after the fallbacks' beam, its tree for the
  searched count alone: commit 109e4d8) was tried and measured worse: the
  learnt costs run low under load, and charging every kept job the tree of the
  whole batch is the margin that covers it. The demo's V-STAR checkpoint, 32
  VED clients, four runs of each alternating (``vstar bench serve --clients 1
  --caps 40,80,150 --ved-clients 32 --mixed-ved-clients 0 --duration-s 10
  --torch-threads 1``, 2 idle cores): at cap 40 ms popularity answered
  0.27-0.92 of requests against 0.16-0.46, at 80 ms the search 0.33-0.48
  against 0.44, 0.02, 0.45 and 0.05, p99 alike.
* Overruns are reported to the deadline margin by the model thread, when the
  search ends, so the margin learns from searches whose request the hard cap
  already answered.
* Beam requests do not wait for a VED search in flight: those that arrive
  while it runs, or queued when it started, are decoded between its forwards
  (``MicroBatcher``'s lane, ``models.ved``'s ``between_steps``: after the
  prefill, between the initial tree's levels, before each step), on the same
  thread, while its deadline has not passed; a batch decodes its beam groups
  first. Their time counts against the search's deadline (VED is
  anytime: under mixed load it searches less, and its cap holds), and a beam
  decode that runs past the deadline is an overrun the margin learns, as it
  is for the answer of that search; the initial tree's learnt cost leaves it
  out. Measured with ``vstar bench serve``'s mixed cell (one beam client beside
  two VED clients at cap 1,000 ms, the demo's V-STAR checkpoint, 2 CPU cores,
  two runs each): beam p99 24-27 ms against 51-62 ms when beam waits, VED p99
  169-172 ms against 50-64 ms. ``beam_between_ved_steps`` (true) turns it off.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from models.beam_search import BeamSearchConfig, beam_search
from models.checkpoint import CheckpointError, LoadedCheckpoint
from models.device import synchronize
from models.node_bonus import NodeBonus
from models.sid_catalog import Sid
from models.transition import checkpoint_fusion
from models.value_head import ValueHead
from models.ved import ved_search
from models.ved_config import (
    VEDConfig,
    VEDStats,
    checkpoint_ved_config,
    initial_beam_stats,
    initial_beam_width,
    resolve_budget,
)
from service.availability import file_version, read_unavailable
from service.batcher import MicroBatcher
from service.deadline import BatchCost, DeadlineMargin
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.warmup_signals import stop_on_signals, stopped

log = logging.getLogger("service.decode_scheduler")


@dataclass(frozen=True)
class DecodeJob:
    history: tuple[Sid, ...]  # the SIDs the prompt sees, oldest first
    deadline: float | None = None  # VED: time.perf_counter() value to stop by
    answer_by: float | None = None  # VED: the hard cap; a job that cannot be decoded by then is shed
    items: tuple[int, ...] = ()  # with shallow fusion: the history's last items (-1: a SID several items share)


@dataclass(frozen=True)
class DecodePlan:
    """What one request asks the model for: decoded under ``config`` (jobs of equal configs share a decode),
    then ranked less ``excluded``, the items the user has when ``exclude_history`` is on."""

    config: BeamSearchConfig | VEDConfig
    job: DecodeJob  # the SIDs the prompt sees, and the items the fusion reads; no deadline
    excluded: frozenset[int]


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


class DecodeScheduler:
    """The model, the executor thread and the batcher; VED's deadline margin and the fallbacks' learnt costs."""

    def __init__(
        self,
        checkpoint: LoadedCheckpoint,
        value_head: ValueHead,
        settings: Settings,
        metrics: ServiceMetrics,
    ) -> None:
        self.policy = checkpoint.policy
        self.checkpoint_path = checkpoint.path
        self.value_head = value_head
        # VED searches as the checkpoint trained it to (vstar eval --decoder ved does the same), without RL's
        # exploratory slots (a list is ranked by score) and with each request's budget, not a stored one
        self.ved_settings = replace(checkpoint_ved_config(checkpoint, settings.default_k, explore_slots=0), budget=None)
        try:  # VED's own rule for the catalogs it can search (the warm-up's VED decode would die on the others)
            resolve_budget(self.ved_settings, self.policy.catalog.depth)
        except ValueError as e:
            raise CheckpointError(
                f"checkpoint {checkpoint.path}: SIDs of {self.policy.catalog.depth} token: the service also answers "
                f"with VED ({e})"
            ) from None
        self.catalog = checkpoint.policy.catalog
        # the version before the read: a change while it reads is seen as one by the watch (service.availability)
        self.unavailable_version = file_version(settings.unavailable_items) if settings.unavailable_items else None
        self.unavailable = read_unavailable(settings.unavailable_items, self.catalog)
        if self.unavailable.kept_sids is not None:  # the SIDs left without an item leave the search
            self.policy.offer_only(self.unavailable.kept_sids)
        # the trie of the unavailable items in force, which every decode planned from now on must search: a change
        # sets it on the loop, and the model thread swaps it in at the start of its next decode (_swap_in_trie)
        self.trie_in_force = self.policy.trie
        try:  # decoders rank as vstar eval's do by default: fused at the checkpoint's weight, if it has one
            self.fusion = checkpoint_fusion(checkpoint, settings.fusion_weight)
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(
                f"checkpoint {checkpoint.path}: shallow fusion: {e} (VSTAR_FUSION_WEIGHT=0 serves the policy alone)"
            ) from None
        self.settings = settings
        self.metrics = metrics
        self.max_prompt_history = self.policy.prompt.max_history
        self.deadline_margin = DeadlineMargin(settings.ved_margin_ms / 1000)
        metrics.track(metrics.ved_margin, self.deadline_margin.margin_s)  # the margin in force at each scrape
        self.init_cost = BatchCost(settings.ved_init_cost_ms / 1000)  # VED's initial tree
        # the fallback's initial beam; its median, not a high quantile: a job is shed only when it would
        # probably miss its cap, and the hard cap still answers the ones that do. Its reports count from three on,
        # as the tree's: a shed job reports nothing, so one stray spike alone would shed for the whole horizon
        self.beam_cost = BatchCost(settings.ved_init_cost_ms / 1000, quantile=0.5)
        self.executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="vstar-model",
            initializer=lower_priority,
            initargs=(settings.model_thread_nice,),
        )
        self.batcher: MicroBatcher[DecodeJob, DecodeRow] = MicroBatcher(
            self.decode,
            self.executor,
            settings.batch_max_size,
            settings.batch_max_wait_ms / 1000,
            self._on_batch,
            # beams that arrive during a search: between its forwards
            lane=(lambda key: isinstance(key, BeamSearchConfig)) if settings.beam_between_ved_steps else None,
        )

    # ---- lifecycle

    def warmup(self) -> None:
        """Decode one request, then time VED's fallbacks, on the model thread (at its priority), before serving:
        a checkpoint that cannot decode fails the start. A SIGTERM or SIGINT meanwhile stops the warm-up at its
        next decode (``StartupError``), so a replica stopped while it starts is not kept for the whole warm-up."""
        stop = threading.Event()
        with stop_on_signals(stop):  # the log line comes once a signal would stop it
            log.info("warming up", extra={"batch_max_size": self.settings.batch_max_size})
            done = self.executor.submit(self._warmup, stop)
            while True:  # in slices: a signal the kernel gave another thread (the model's) runs its handler here,
                try:  # and Python runs it only when this thread runs, not while it sleeps in one long wait
                    return done.result(timeout=0.05)
                except TimeoutError:
                    continue

    def _warmup(self, stop: threading.Event) -> None:
        first = self.catalog.sids[0]
        for config in (BeamSearchConfig(self.settings.default_k), self.ved_settings):
            stopped(stop)
            rows = self.decode(config, [DecodeJob((first,))])
            # not an assert: python -O would drop it and serve a model that cannot; a score of nan or inf (a
            # fusion weight that overflows) ranks nothing, and every answer would be empty
            if rows[0].sid_index[0] < 0 or not math.isfinite(rows[0].scores[0]):
                raise CheckpointError(
                    f"checkpoint {self.checkpoint_path}: warm-up decode ({type(config).__name__}) returned no valid SID"
                    " with a finite score"
                )
        self._time_ved_fallbacks(stop)

    def _time_ved_fallbacks(self, stop: threading.Event) -> None:
        """Time VED's initial tree (a passed deadline stops it there) and the initial beam per batch bucket,
        on the longest prompts, fused as served (``_busiest_items``); the least of three runs is the decode's
        own cost (one-off allocations and load spikes are not)."""
        config = replace(self.ved_settings, deadline=0.0)
        job = DecodeJob(tuple(self.catalog.sids[: self.max_prompt_history]), items=self._busiest_items())
        batch = 1
        while True:
            stopped(stop)
            jobs = [job] * batch
            ids, mask = self.policy.encode_prompts([list(job.history)] * batch)
            tree, beam = [], []
            for _ in range(3):
                started = time.perf_counter()  # the fusion's bonus included, as _ved times a search
                ved_search(
                    self.policy.model, self.value_head, self.policy.trie, ids, mask, config, bonus=self._bonus(jobs)
                )
                synchronize(self.policy.device)  # on a GPU its last kernels may still be queued
                tree.append(time.perf_counter() - started)
                started = time.perf_counter()
                self._initial_beam(replace(config, deadline=None), jobs, report=False)
                beam.append(time.perf_counter() - started)
            self.init_cost.set_baseline(batch, min(tree))
            self.beam_cost.set_baseline(batch, min(beam))
            if batch >= self.settings.batch_max_size:
                return
            batch *= 2

    def _busiest_items(self) -> tuple[int, ...]:
        """A history for timing the fusion's bonus: the counts' window of the items most transitions leave
        (the bonus's cost grows with them, as the prompt's with its length); none without fusion."""
        if self.fusion is None:
            return ()
        counts = self.fusion.counts
        return tuple(heapq.nlargest(counts.window, counts.counts, key=lambda item: len(counts.counts[item])))

    def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        await self.batcher.stop()
        await asyncio.to_thread(self.executor.shutdown, wait=True)  # a decode may still run: not on the loop
        await self.batcher.stop()  # the lane's jobs that decode's run_waiting put back while the first stop ran

    def decode(self, key: Hashable, jobs: Sequence[DecodeJob]) -> list[DecodeRow]:
        """One group's decode, on the calling thread: jobs of one config (``key``), a row each. The batcher's
        ``run`` on the model thread, and ``vstar recommend``'s (``service.batch_recommend``): VED jobs without a
        deadline or a hard cap are searched to their budget, none shed and none falling back."""
        self._swap_in_trie()
        if isinstance(key, BeamSearchConfig):
            return self._beam(key, jobs)
        assert isinstance(key, VEDConfig) and key.deadline is None
        now = time.perf_counter()
        kept = self._admit(jobs, now)
        cost = self.init_cost.cost_s(sum(kept))
        late = [k and j.deadline is not None and j.deadline - now < cost for j, k in zip(jobs, kept, strict=True)]
        rows = [SHED] * len(jobs)
        if shed := [i for i, k in enumerate(kept) if not k]:
            self.batcher.answer_now(shed, [SHED] * len(shed))  # at once: no model work for them
        fallen = [i for i, x in enumerate(late) if x]
        searched = [i for i, (k, x) in enumerate(zip(kept, late, strict=True)) if k and not x]
        for part, decode in ((fallen, self._initial_beam), (searched, self._ved)):  # the nearest deadlines first
            if part:
                for i, row in zip(part, decode(key, [jobs[i] for i in part]), strict=True):
                    rows[i] = row
                self.batcher.answer_now(part, [rows[i] for i in part])  # now, not once the others' decodes end
        return rows

    def _swap_in_trie(self) -> None:
        """On the model thread, between decodes: the trie in force, if a change of the unavailable items set a new
        one. A beam decode between a VED search's steps swaps it in too, since it was planned under the new list
        (its width counts the SIDs that list takes out); the search goes on with the trie it was given."""
        if self.policy.trie is not self.trie_in_force:
            self.policy.trie = self.trie_in_force

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

    def _bonus(self, jobs: Sequence[DecodeJob]) -> NodeBonus | None:
        """The shallow fusion's (jobs, trie nodes) bonus from each job's last items; None without fusion."""
        if self.fusion is None:
            return None
        return self.fusion.node_bonus([j.items for j in jobs], self.catalog, self.policy.trie)

    def _beam(self, config: BeamSearchConfig, jobs: Sequence[DecodeJob]) -> list[DecodeRow]:
        ids, mask = self.policy.encode_prompts([list(j.history) for j in jobs])
        res = beam_search(self.policy.model, self.policy.trie, ids, mask, config, self._bonus(jobs))
        return [DecodeRow(s, sc) for s, sc in zip(res.sid_index.tolist(), res.scores.tolist(), strict=True)]

    def _ved(self, config: VEDConfig, jobs: Sequence[DecodeJob]) -> list[DecodeRow]:
        deadlines = [j.deadline for j in jobs if j.deadline is not None]
        config = replace(config, deadline=min(deadlines, default=None))
        ids, mask = self.policy.encode_prompts([list(j.history) for j in jobs])
        beams_s, deadline = 0.0, math.inf if config.deadline is None else config.deadline  # beams_s: between steps

        def between_steps() -> None:  # beams until the deadline: past it, the search stops at its next check
            nonlocal beams_s
            began = time.perf_counter()
            if decoded := self.batcher.run_waiting(until=lambda: time.perf_counter() >= deadline):
                self.metrics.beam_between_ved.inc(decoded)
            beams_s += time.perf_counter() - began

        started = time.perf_counter()
        out = ved_search(
            self.policy.model,
            self.value_head,
            self.policy.trie,
            ids,
            mask,
            config,
            bonus=self._bonus(jobs),
            between_steps=between_steps,
        )
        synchronize(self.policy.device)  # the search is done when its kernels are, not when they are queued
        finished = time.perf_counter()
        # what the tree grew by after the initial one: a search's selections, or a completion's levels (a budget
        # that covers the catalog: ``models.ved``), which makes no selections, so iterations cannot tell
        if all(st.cap_hit and st.tokens_spent == st.init_tokens for st in out.stats):  # stopped right after it
            self.init_cost.report(len(jobs), finished - started - beams_s)
        elif config.deadline is not None and any(st.cap_hit and st.tokens_spent > st.init_tokens for st in out.stats):
            # the loop ran and the deadline stopped it: learn how far past the deadline it finished. Reported
            # here, not by the request, so it is learnt even when the hard cap answered that request already.
            self.deadline_margin.report(finished - config.deadline)
        rows = zip(out.decode.sid_index.tolist(), out.decode.scores.tolist(), out.stats, strict=True)
        return [DecodeRow(s, sc, st) for s, sc, st in rows]

    def _initial_beam(self, config: VEDConfig, jobs: Sequence[DecodeJob], report: bool = True) -> list[DecodeRow]:
        """The anytime fallback: VED's initial beam without the tree, with stats that say what was spent."""
        trie = self.policy.trie
        started = time.perf_counter()
        rows = self._beam(BeamSearchConfig(initial_beam_width(config, trie)), jobs)
        if report:
            self.beam_cost.report(len(jobs), time.perf_counter() - started)
        stats = initial_beam_stats(config, trie)  # the same for every row: the config's, not the prompt's
        return [replace(row, stats=stats, fallback=True) for row in rows]

    def _on_batch(self, key: Hashable, size: int) -> None:
        if isinstance(key, BeamSearchConfig):
            self.metrics.batch_size.observe(size)
