"""Ranking metrics, computed exactly as MiniOneRec computes them.

A recommendation list is a ranked list of SID indices; the target counts as hit
at rank r (0-based) if its SID stands at position r. HR@K = share of rows with
r < K; NDCG@K = mean of 1 / log2(r + 2) over rows with r < K (one relevant item,
so the ideal DCG is 1). Item-based baselines are mapped to SIDs first (an item's
SID, first occurrence kept), so every recommender is scored by this one code. A
list is scored as its distinct SIDs (``distinct_sids``, first occurrence kept): a
SID listed twice takes one place, not two (beam search and VED return distinct
SIDs; the rule holds for any decoder). A recommended SID shared by several items
is a hit for each of them: the metrics are on SIDs, as MiniOneRec's are.

Beyond accuracy: ``coverage@K`` is the share of catalog items that appear (via
their SID) in some top-K list; ``tail_share@K`` is the share of recommended items
that are long-tail, i.e. outside the most popular 20% of items by training
interactions (the usual Pareto split), counted as their appearances in the
training rows: each row's history items and its target (``evaluate``). The
rows are sliding windows, so an early item of a user counts once for each of
that user's later rows; ties at the boundary go by item id.

A cut-off K beyond the ranked lists (``vstar eval --beams 20`` and HR@50) is not
a measurement: what ranks 21 to 50 would have held is unknown, and HR@50 would
only repeat HR@20. Such figures are None (null in the JSON files, "-" in printed
tables), unless the lists rank every SID of the catalog: then a target below
them is a miss at any cut-off.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

from models.sid_catalog import SidCatalog

CUTOFFS = (1, 3, 5, 10, 20, 50)


def distinct_sids(ranked: Sequence[int]) -> list[int]:
    """``ranked`` without repeats, first occurrence kept: the list a user would be shown."""
    return list(dict.fromkeys(ranked))


def target_rank(ranked: Sequence[int], target: int) -> int | None:
    for r, sid in enumerate(ranked):
        if sid == target:
            return r
    return None


def measures(ranked_lists: Sequence[Sequence[int]], k: int, catalog_size: int | None = None) -> bool:
    """Whether the lists measure cut-off ``k``: the longest is at least ``k`` long, or ranks all
    ``catalog_size`` SIDs."""
    longest = max((len(lst) for lst in ranked_lists), default=0)
    return longest >= k or (catalog_size is not None and longest >= catalog_size)


def rank_metrics(
    ranked_lists: Sequence[Sequence[int]],
    targets: Sequence[int],
    cutoffs: Iterable[int] = CUTOFFS,
    catalog_size: int | None = None,
) -> dict[str, float | None]:
    """HR@K and NDCG@K per cut-off, of each list's distinct SIDs; None for a cut-off the lists do not measure
    (``measures``)."""
    if len(ranked_lists) != len(targets):
        raise ValueError(f"{len(ranked_lists)} ranked lists for {len(targets)} targets")
    ranked_lists = [distinct_sids(lst) for lst in ranked_lists]  # a SID listed twice takes one place
    ranks = [target_rank(lst, t) for lst, t in zip(ranked_lists, targets, strict=False)]
    values = metrics_of_ranks(ranks, cutoffs)
    return {
        name: value if measures(ranked_lists, int(name.split("@")[1]), catalog_size) else None
        for name, value in values.items()
    }


def metrics_of_ranks(ranks: Sequence[int | None], cutoffs: Iterable[int] = CUTOFFS) -> dict[str, float]:
    """HR@K and NDCG@K of the targets' ranks (0-based, None: not ranked), whether or not the lists measure K:
    ``rank_metrics``' figures where they do."""
    n = max(len(ranks), 1)
    out: dict[str, float] = {}
    for k in cutoffs:
        out[f"HR@{k}"] = sum(1 for r in ranks if r is not None and r < k) / n
        out[f"NDCG@{k}"] = sum(1.0 / math.log2(r + 2) for r in ranks if r is not None and r < k) / n
    return out


def tail_items(catalog: SidCatalog, train_item_counts: Counter[int], head_share: float = 0.2) -> set[int]:
    """Items outside the most popular ``head_share`` of the catalog."""
    order = sorted(catalog.items, key=lambda i: (-train_item_counts.get(i, 0), i))
    n_head = int(round(head_share * len(order)))
    return set(order[n_head:])


def beyond_accuracy(
    ranked_lists: Sequence[Sequence[int]], catalog: SidCatalog, tail: set[int], k: int = 10
) -> dict[str, float | None]:
    """coverage@K and tail_share@K of each list's distinct SIDs; None when the lists do not measure K
    (``measures``)."""
    ranked_lists = [distinct_sids(lst) for lst in ranked_lists]  # a SID listed twice takes one place
    if not measures(ranked_lists, k, len(catalog.sids)):
        return {f"coverage@{k}": None, f"tail_share@{k}": None}
    covered: set[int] = set()
    recommended = tail_hits = 0
    for lst in ranked_lists:
        for sid in lst[:k]:
            items = catalog.items_of_sid[sid]
            covered.update(items)
            recommended += len(items)
            tail_hits += sum(1 for i in items if i in tail)
    return {
        f"coverage@{k}": len(covered) / catalog.num_items,
        f"tail_share@{k}": tail_hits / max(recommended, 1),
    }


def items_to_sid_ranking(items: Iterable[int], catalog: SidCatalog, limit: int) -> list[int]:
    """Rank SIDs by their first item in an item ranking (for item-based baselines)."""
    seen: set[int] = set()
    out: list[int] = []
    for i in items:
        s = catalog.sid_index[catalog.items[i].sid]
        if s not in seen:
            seen.add(s)
            out.append(s)
            if len(out) == limit:
                break
    return out
