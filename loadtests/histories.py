"""Real user histories for the load test, read from one split of a data set folder.

A light CSV reader rather than ``training.data.dataset.load_dataset``: the locust
process only needs ``user_id``, the history item ids, their SID strings and the
target of each row, and it must not import torch or build the catalog (it runs
under gevent, and it starts once per measured point). The rows are the ones the
model is evaluated on, so the service sees the same history lengths and item
popularity as in the offline evaluation. Validation stays with the service: a
row the catalog does not know comes back as a 4xx and counts as a failure.
"""

from __future__ import annotations

import ast
import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The columns this reader needs out of MiniOneRec's seven (see training/data/dataset.py).
NEEDED = ("user_id", "history_item_id", "history_item_sid", "item_id")


@dataclass(frozen=True)
class HistoryRow:
    user_id: str
    item_ids: tuple[int, ...]  # oldest first
    sids: tuple[str, ...]  # the same items as SID strings, "<a_1><b_2><c_3>"
    target: int


def read_histories(path: Path, limit: int | None = None) -> list[HistoryRow]:
    """Rows of one split CSV with a non-empty history; ``ValueError`` naming file and line on a bad row."""
    if not path.is_file():
        raise ValueError(f"{path}: file not found (expected a split CSV such as DATA/test.csv)")
    rows: list[HistoryRow] = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in NEEDED if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}:1: missing columns {missing}")
        for row in reader:
            ids = _list(row["history_item_id"], path, reader.line_num)
            sids = _list(row["history_item_sid"], path, reader.line_num)
            if len(ids) != len(sids):
                raise ValueError(f"{path}:{reader.line_num}: {len(ids)} history ids but {len(sids)} SIDs")
            if ids:
                history = tuple(_int(i, path, reader.line_num) for i in ids)
                target = _int(row["item_id"], path, reader.line_num)
                rows.append(HistoryRow(row["user_id"], history, tuple(str(s) for s in sids), target))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"{path}: no row with a non-empty history")
    return rows


def split_path(data_dir: Path, split: str) -> Path:
    """The CSV of ``split`` in the project's data set folder layout."""
    return Path(data_dir) / f"{split}.csv"


def _list(text: str, path: Path, line: int) -> list[Any]:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"{path}:{line}: bad list literal {text[:60]!r}") from None
    if not isinstance(value, list):
        raise ValueError(f"{path}:{line}: expected a list, got {type(value).__name__}")
    return value


def _int(value: object, path: Path, line: int) -> int:
    """An item id: an integer, or an int-like string as the CSV holds it."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"{path}:{line}: item id {str(value)[:60]!r} is not an integer") from None


class HistorySampler:
    """Seeded draws of rows; each simulated user gets its own stream so runs repeat."""

    def __init__(self, rows: list[HistoryRow], seed: int) -> None:
        if not rows:
            raise ValueError("HistorySampler needs at least one row")
        self.rows = rows
        self.seed = seed

    def stream(self, user_index: int) -> random.Random:
        """An independent RNG for the ``user_index``-th simulated user."""
        return random.Random(self.seed * 1_000_003 + user_index)

    def draw(self, rng: random.Random) -> HistoryRow:
        return self.rows[rng.randrange(len(self.rows))]
