"""Where one recommender beats another: ``vstar compare --by``, the paired comparison within segments of rows.

A whole-split difference can hide a win on some rows and a loss on others (a model that beats the count model
on short histories and loses on long ones). ``--by`` splits the scored rows, read back from the data folder,
and compares the two methods within each segment exactly as over the whole split
(``training.evaluation.compare.paired_bootstrap``: the same seeds, draws and figures):

* ``history``: the row's history length as the data holds it (before any prompt window): 1, 2-3, 4-6, 7-10,
  11 or more items;
* ``target``: the target item's popularity in ``--train-splits``' rows, counted as ``tail_share@10`` counts
  it (``training.evaluation.metrics.tail_items``: every history item and target): ``head`` (the most popular
  20% of the catalog's items), ``tail`` (the rest, seen at least once), ``unseen`` (never in those rows).

The rows are the ones the eval files scored: the split the files name, whole, or its first or last N rows
(``vstar eval --limit N``, ``--holdout N``), told apart by the files' ``rows_fingerprint``; rows that are
none of those are refused (nothing here can tell which rows a file scored). A segment of fewer than
``compare.MIN_SEGMENT_ROWS`` rows is listed with its size and no figures: its interval would say little.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from training.data.dataset import RecDataset, Sample, rows_fingerprint
from training.evaluation.compare import Segmenter
from training.evaluation.metrics import tail_items

SEGMENTS = ("history", "target")
HISTORY_BUCKETS = ((1, 1), (2, 3), (4, 6), (7, 10), (11, None))  # (first, last) lengths; None: no upper bound


def scored_rows(data: RecDataset, split: str, rows: int, fingerprint: str | None) -> list[Sample]:
    """The ``rows`` rows of ``split`` the eval files scored: the whole split, its first or its last ``rows``,
    whichever has the files' ``fingerprint`` (without one, only a whole split is taken)."""
    if split not in data.splits:
        raise ValueError(f"the eval files scored split {split!r}, which the data set has not ({sorted(data.splits)})")
    every = data.splits[split]
    if fingerprint is None:  # nothing to tell the split's parts apart by
        if rows == len(every):
            return list(every)
        raise ValueError(
            f"the eval files scored {rows} of {split}'s {len(every)} rows and record no rows_fingerprint (written "
            "before vstar recorded one): which rows they scored cannot be told"
        )
    for rows_of in (every, every[:rows], every[-rows:]):
        if len(rows_of) == rows and rows_fingerprint(rows_of) == fingerprint:
            return list(rows_of)
    raise ValueError(
        f"the eval files scored {rows} rows of {split}, none of its whole {len(every)} rows, its first {rows} or "
        f"its last {rows} (vstar eval --limit / --holdout): is --data the data set they scored?"
    )


def history_segment(length: int) -> str:
    for first, last in HISTORY_BUCKETS:
        if last is None and length >= first:
            return f"history {first}+"
        if last is not None and first <= length <= last:
            return f"history {first}" if first == last else f"history {first}-{last}"
    return "history 0"  # an empty history (the format allows it; no MiniOneRec row has one)


def target_segment(item: int, counts: Counter[int], tail: set[int]) -> str:
    if not counts.get(item):
        return "target unseen"
    return "target tail" if item in tail else "target head"


def row_segments(data: RecDataset, rows: Sequence[Sample], by: str, train_splits: Sequence[str]) -> list[str]:
    """Each row's segment (module doc)."""
    if by == "history":
        return [history_segment(len(r.history)) for r in rows]
    counts: Counter[int] = Counter()
    for s in data.samples(train_splits):  # as evaluate counts for tail_share@10
        counts.update(s.history)
        counts[s.target] += 1
    tail = tail_items(data.catalog, counts)
    return [target_segment(r.target, counts, tail) for r in rows]


def segment_order(names: Sequence[str]) -> list[str]:
    """Segments in their natural order (histories short to long; head, tail, unseen), each once."""
    order = ["history 0", *(history_segment(first) for first, _ in HISTORY_BUCKETS)]
    order += ["target head", "target tail", "target unseen"]
    return sorted(set(names), key=order.index)


def segment_rows(segments: Sequence[str]) -> dict[str, list[int]]:
    """Row indices of each segment, in ``segment_order``."""
    out: dict[str, list[int]] = {name: [] for name in segment_order(segments)}
    for i, name in enumerate(segments):
        out[name].append(i)
    return out


def describe(by: str, train_splits: Sequence[str]) -> dict[str, Any]:
    """What the segments are, for the comparison's JSON."""
    if by == "history":
        return {"by": by, "what": "history length, as the data holds it"}
    return {
        "by": by,
        "what": "target popularity in the rows of "
        + ",".join(train_splits)
        + ": head = the most popular 20% of items, tail = the rest seen, unseen = never seen",
    }


def segmenter(data: RecDataset, by: str, train_splits: Sequence[str]) -> Segmenter:
    """``vstar compare --by``'s segments of the compared files' rows, read back from ``data``."""
    if by not in SEGMENTS:
        raise ValueError(f"--by {by!r}: segments are {', '.join(SEGMENTS)}")

    def segments(split: str | None, rows: int, fingerprint: str | None) -> tuple[dict[str, Any], dict[str, list[int]]]:
        if split is None:
            raise ValueError("the eval files record no split (written by hand?): --by cannot read their rows back")
        names = row_segments(data, scored_rows(data, split, rows, fingerprint), by, train_splits)
        return describe(by, train_splits) | {"split": split}, segment_rows(names)

    return segments
