"""Offline evaluation: decode every row of a split and score the ranked SIDs.

Rows are decoded in batches sorted by prompt length (less padding); results are
put back in row order before scoring. The decoder is any ``DecodeFn``
(``training.evaluation.decoders``: beam search, fused or not, or VED); it sees
each batch's prompts and the item histories they encode, which is what beam
search's shallow fusion with the transition counts needs.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from models.policy import Policy, pad_left
from training.data.dataset import Sample, rows_fingerprint
from training.distributed import shard_rows, weighted_mean, world_size
from training.evaluation.decoders import DecodeFn
from training.evaluation.metrics import (
    CUTOFFS,
    beyond_accuracy,
    distinct_sids,
    metrics_of_ranks,
    rank_metrics,
    tail_items,
    target_rank,
)

log = logging.getLogger(__name__)


def rank_samples(
    policy: Policy,
    samples: Sequence[Sample],
    decode: DecodeFn,
    batch_size: int = 32,
    progress: bool = True,
) -> list[list[int]]:
    """Ranked SID indices per sample, in the samples' order."""
    catalog = policy.catalog
    prompts = [policy.prompt.encode(policy.tokenizer, [catalog.sid_of(i) for i in s.history]) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: len(prompts[i]))
    ranked: list[list[int]] = [[] for _ in samples]
    was_training = policy.model.training
    policy.model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="decode", disable=not progress, leave=False):
            idx = order[start : start + batch_size]
            ids, mask = pad_left([prompts[i] for i in idx], int(policy.tokenizer.pad_token_id), policy.device)
            rows = decode(policy, ids, mask, [samples[i].history for i in idx]).ranked()
            if len(rows) != len(idx):  # else the rows left without a list would count as misses, unsaid
                raise ValueError(f"the decoder returned {len(rows)} ranked lists for a batch of {len(idx)} prompts")
            for i, row in zip(idx, rows, strict=True):
                ranked[i] = row
    finally:
        policy.model.train(was_training)
    return ranked


def evaluate(
    policy: Policy,
    samples: Sequence[Sample],
    train_samples: Sequence[Sample],
    decode: DecodeFn,
    batch_size: int = 32,
    cutoffs: Sequence[int] = CUTOFFS,
    progress: bool = True,
) -> dict[str, Any]:
    """Metrics of ``decode`` on ``samples``; ``train_samples`` define the long tail."""
    start = time.perf_counter()
    ranked = rank_samples(policy, samples, decode, batch_size, progress)
    return score_rankings(ranked, samples, train_samples, policy.catalog, cutoffs, time.perf_counter() - start)


@functools.cache  # once a process: every validation of a run scores the same catalog
def warn_whole_catalog(sids: int, cutoffs: tuple[int, ...]) -> None:
    """A list as long as the catalog holds every SID: a cut-off that long measures nothing."""
    log.warning(
        "the catalog has %d SIDs: at K = %s a list holds every one, so HR@K is 1 by construction",
        sids, ", ".join(map(str, cutoffs)),
    )  # fmt: skip


def score_rankings(
    ranked: Sequence[Sequence[int]],
    samples: Sequence[Sample],
    train_samples: Sequence[Sample],
    catalog: Any,
    cutoffs: Sequence[int] = CUTOFFS,
    seconds: float = 0.0,
) -> dict[str, Any]:
    ranked = [distinct_sids(lst) for lst in ranked]  # a SID listed twice takes one place (``metrics``)
    targets = [catalog.sid_index[catalog.items[s.target].sid] for s in samples]
    metrics = rank_metrics(ranked, targets, cutoffs, len(catalog.sids))  # None: a cut-off beyond the lists
    whole = tuple(k for k in cutoffs if k >= len(catalog.sids) and metrics.get(f"HR@{k}") is not None)
    if whole and samples:
        warn_whole_catalog(len(catalog.sids), whole)
    ranks = [target_rank(lst, t) for lst, t in zip(ranked, targets, strict=True)]
    counts: Counter[int] = Counter()
    for s in train_samples:
        counts.update(s.history)
        counts[s.target] += 1
    metrics |= beyond_accuracy(ranked, catalog, tail_items(catalog, counts), k=10)
    # target_ranks (0-based, None: not ranked) let ``vstar compare`` pair two runs row by row
    return {
        "metrics": metrics,
        "rows": len(samples),
        "rows_fingerprint": rows_fingerprint(samples),  # ``vstar compare`` pairs only runs over the same rows
        "seconds": round(seconds, 2),
        "target_ranks": ranks,
    }


def sharded_metrics(
    policy: Policy, rows: Sequence[Sample], train_rows: Sequence[Sample], decode: DecodeFn, names: Sequence[str]
) -> dict[str, float | None]:
    """The HR@K / NDCG@K ``names`` of ``evaluate`` on ``rows``, each rank decoding its contiguous slice and the
    figures row-weighted over the ranks (summed in rank order, so every rank gets the same); one process: every
    row. A rank left without a row (more ranks than rows) weighs 0. A figure is None, as one process's, when no
    rank's lists measure its cut-off (``metrics.measures``: a model that scores too few SIDs as finite); a rank
    whose own lists fall short then counts its rows' hits all the same, as one process would."""
    part = shard_rows(rows)
    metrics: dict[str, Any] = dict.fromkeys(names)
    ranks: list[int | None] = []
    if part or world_size() == 1:
        scored = evaluate(policy, part, train_rows, decode, progress=False)
        metrics, ranks = scored["metrics"], scored["target_ranks"]
    values = metrics_of_ranks(ranks, sorted({int(name.split("@")[1]) for name in names}))
    measured = {f"{k} measured": float(metrics[k] is not None) for k in names}
    combined = weighted_mean({k: values[k] for k in names} | measured, len(part), maxed=tuple(measured))
    return {k: combined[k] if combined[f"{k} measured"] else None for k in names}
