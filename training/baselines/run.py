"""Baselines for the README table: most-popular, item transitions and SASRec, scored like the generative model.

Design decisions:

* Every baseline ranks items per row; the ranking is mapped to a ranking of
  ``RANKING_LENGTH`` (50) SIDs with ``training.evaluation.metrics.items_to_sid_ranking`` (an
  item stands for its SID, the first occurrence counts) and scored by
  ``training.evaluation.evaluate.score_rankings``, the code behind ``vstar eval``. So the
  output has eval's shape and its numbers compare like with like.
* Several items may share a SID, so an item ranking is cut at
  ``50 + items - SIDs`` entries: the fewest that always yield 50 distinct SIDs.
* Popularity counts the *targets* of the training rows by default. The data
  sets are sliding windows over each user's timeline, so an interaction is the
  target of exactly one row but sits in up to 10 histories; counting history
  occurrences too (``pop_counts="all"``) weights an item by how many later
  rows its user has rather than by how often it is bought. Measured on
  amazon-industrial (train+valid, test): targets 0.0728 / 0.0549 HR@10 / NDCG@10
  (the reference figures), targets + histories 0.0631 / 0.0514.
* The transition model (``models.transition``: the items that followed the
  history's last three items, weighted 1, 1/2, 1/3; popularity breaks ties and
  fills the list) is the bar a sequence model must clear first: on data this
  sparse, a single observed transition is strong evidence at the top ranks.
* Pop and transitions have nothing to select, so they count every row of ``--train-splits``.
  SASRec selects its epoch on rows it does not train on, by SFT's rule
  (``training.data.dataset.training_rows``, shared with SFT and RL): the valid
  split, or, when valid is trained on, its most recent ``holdout`` rows; a
  ``holdout`` that takes all of valid while ``--train-splits`` names it is refused,
  as SFT refuses it. Test is never trained on nor selected on, and the evaluated
  split may not be trained on.
* tail_share@10's long tail is counted over every row of ``--train-splits`` for
  all three, SASRec's held-out block included (as ``vstar eval --train-splits``
  counts it), so the rows of one table share one tail.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from models.sid_catalog import SidCatalog
from models.transition import TransitionCounts
from training.baselines.sasrec import ItemIndex, SASRec, SASRecConfig, rank_items, train_sasrec
from training.data.dataset import SPLITS, Holdout, RecDataset, Sample, training_rows
from training.evaluation.evaluate import score_rankings
from training.evaluation.metrics import items_to_sid_ranking

log = logging.getLogger(__name__)

BASELINES = ("pop", "transition", "sasrec")
POP_COUNTS = ("targets", "all")
RANKING_LENGTH = 50  # SIDs per row, as `vstar eval --beams 50`


def check_request(data: RecDataset, name: str, split: str, train_splits: Sequence[str]) -> None:
    """``ValueError`` naming the problem for a baseline, split or training split that cannot be run."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {BASELINES}")
    if split not in data.splits:
        raise ValueError(f"unknown split {split!r}; the data set has {sorted(data.splits)}")
    bad = [s for s in train_splits if s not in SPLITS]
    if not train_splits or bad:
        raise ValueError(f"training splits must be a non-empty subset of {SPLITS}, got {list(train_splits)}")
    if "test" in train_splits:
        raise ValueError("training on the test split is not allowed")
    if split in train_splits:
        raise ValueError(f"split {split!r} is trained on; evaluate on a split outside --train-splits")
    if not data.splits[split]:
        raise ValueError(f"the {split} split of {data.name} has no rows to score")


def ranking_depth(catalog: SidCatalog, limit: int = RANKING_LENGTH) -> int:
    """Items to rank so that ``limit`` distinct SIDs are always among them."""
    return min(catalog.num_items, limit + catalog.num_items - len(catalog.sids))


def sid_rankings(
    item_rankings: Sequence[Sequence[int]], catalog: SidCatalog, limit: int = RANKING_LENGTH
) -> list[list[int]]:
    return [items_to_sid_ranking(items, catalog, limit) for items in item_rankings]


def popularity(rows: Sequence[Sample], counts: str = "targets") -> Counter[int]:
    """Item counts over ``rows``: their targets, plus their history items when ``counts == "all"``."""
    if counts not in POP_COUNTS:
        raise ValueError(f"pop counts must be one of {POP_COUNTS}, got {counts!r}")
    out: Counter[int] = Counter()
    for s in rows:
        out[s.target] += 1
        if counts == "all":
            out.update(s.history)
    return out


def popular_items(counts: Counter[int], catalog: SidCatalog) -> list[int]:
    """Every catalog item, most counted first; ties by item id, so the order is deterministic."""
    return sorted(catalog.items, key=lambda i: (-counts.get(i, 0), i))


def run_pop(data: RecDataset, split: str, train_splits: Sequence[str], counts: str = "targets") -> dict[str, Any]:
    """Score the most-popular list (the same for every row) on ``split``."""
    check_request(data, "pop", split, train_splits)
    start = time.perf_counter()
    train_rows = data.samples(train_splits)
    items = popular_items(popularity(train_rows, counts), data.catalog)
    ranking = items_to_sid_ranking(items, data.catalog, RANKING_LENGTH)
    rows = data.splits[split]
    result = score_rankings([ranking] * len(rows), rows, train_rows, data.catalog, seconds=time.perf_counter() - start)
    return result | _header("pop", split, train_splits, len(train_rows)) | {"pop_counts": counts}


def run_transition(data: RecDataset, split: str, train_splits: Sequence[str], window: int = 3) -> dict[str, Any]:
    """Score the item-transition count model on ``split``."""
    check_request(data, "transition", split, train_splits)
    start = time.perf_counter()
    train_rows = data.samples(train_splits)
    counts = TransitionCounts.fit(((s.history, s.target) for s in train_rows), window)
    popular = popular_items(popularity(train_rows), data.catalog)
    depth = ranking_depth(data.catalog)
    rows = data.splits[split]
    ranked = sid_rankings([counts.rank_items(s.history, popular, depth) for s in rows], data.catalog)
    result = score_rankings(ranked, rows, train_rows, data.catalog, seconds=time.perf_counter() - start)
    header = _header("transition", split, train_splits, len(train_rows))
    return result | header | {"window": window, "transition_pairs": counts.num_pairs}


def run_sasrec(
    data: RecDataset,
    split: str,
    train_splits: Sequence[str],
    config: SASRecConfig,
    holdout: int = 500,
    progress: bool = True,
) -> dict[str, Any]:
    """Train SASRec, select its epoch on the selection rows, score it on ``split``."""
    check_request(data, "sasrec", split, train_splits)
    train_rows, select_rows = training_rows(data, Holdout(tuple(train_splits), holdout))
    if not select_rows:
        raise ValueError(
            f"SASRec chooses its epoch on valid rows, and valid.csv of {data.name} has none: put the most recent "
            "rows before test's in valid.csv, or score pop or transition, which choose nothing"
        )
    if split == "valid":
        log.warning("the epoch is selected on the valid rows it is scored on: the score is optimistic")
    catalog, index, depth = data.catalog, ItemIndex(data.catalog), ranking_depth(data.catalog)

    def select_score(model: SASRec) -> tuple[float, float]:
        ranked = sid_rankings(rank_items(model, select_rows, index, depth), catalog)
        m = score_rankings(ranked, select_rows, train_rows, catalog)["metrics"]
        return m["HR@10"], m["NDCG@10"]

    model, summary = train_sasrec(catalog, train_rows, select_score, config, progress)
    start = time.perf_counter()
    rows = data.splits[split]
    ranked = sid_rankings(rank_items(model, rows, index, depth), catalog)
    # the long tail of every row of --train-splits, the held-out block included, as pop, transition and eval count it
    tail_rows = data.samples(train_splits)
    result = score_rankings(ranked, rows, tail_rows, catalog, seconds=time.perf_counter() - start)
    log.info(
        "SASRec best epoch %d (selection HR@10 %.4f); %s HR@10 %.4f",
        summary["best"]["epoch"],
        summary["best"]["HR@10"],
        split,
        result["metrics"]["HR@10"],
    )
    header = _header("sasrec", split, train_splits, len(train_rows)) | {"selection_rows": len(select_rows)}
    return result | header | {"train_seconds": summary.pop("train_seconds"), "sasrec": summary}


def _header(name: str, split: str, train_splits: Sequence[str], train_rows: int) -> dict[str, Any]:
    return {
        "baseline": name,
        "split": split,
        "train_splits": list(train_splits),
        "train_rows": train_rows,
        "ranking_length": RANKING_LENGTH,
    }
