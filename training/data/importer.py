"""Raw interaction logs to a data folder (``vstar import``), by MiniOneRec's preprocessing of Amazon reviews.

Input: an events file (``user_id,item_id,timestamp``; other columns are ignored) and an items file
(``item_id,title[,description]``), each a CSV with a header or JSON lines (``.jsonl``), both keyed by the
user's own ids (SKUs, any text).
Output: the folder that README's "Your own catalog" otherwise has the user write by hand: ``item.json``
keyed 0..N-1, ``train.csv`` / ``valid.csv`` / ``test.csv`` in MiniOneRec's columns with the two SID columns
empty (``vstar sids --update-splits`` fills them), ``item_map.json`` (vstar id -> the user's id, which the
checkpoints trained on the folder carry, so the service answers with it and takes it) and ``stats.json`` (what
was read, dropped and written).

The rule is MiniOneRec's (../shared/data/amazon-industrial/README.md). Design decisions:

- Filtering: items no event names are dropped; then the iterative k-core (``min_interactions``; 5, as
  MiniOneRec's 5-core data): users and items with fewer events go, round after round, until none is left
  below it (the result does not depend on the order of removal). A repeated (user, item) event counts each
  time and stays in the sequence, as MiniOneRec kept them.
- Rows: each user's events sorted by timestamp, ties in file order (a stable sort); every event after the
  user's first is one row whose history is the ``max_history`` events before it (MiniOneRec's 10).
- Split: all rows sorted by their target's timestamp (ties: the target's place in the file), cut at
  floor(n * train) and floor(n * (train + valid)), MiniOneRec's ``int(n * 0.8)`` and ``int(n * 0.9)``. The
  shares are exact fractions, so 0.7 + 0.2 cuts at 0.9 and not at 0.8999... A split given a share but left
  without rows (too few events) is an error, not an empty file found at evaluation.
- Item ids: 0..N-1 in the items file's order of the items kept, so the same files import to the same ids.
- Timestamps: numbers (epoch seconds; only their order is used) or ISO 8601 dates (UTC when they name no
  zone), not both in one file: a mix is more likely two clocks than one.
- An event that names an item the items file lacks is an error naming its line and the count of such
  events: a wrong items file would otherwise import as a catalog of the few items it shares by chance.
- Events are held as numpy arrays of codes, so a log of millions of events fits in memory and the k-core
  and the sorts are vectorised; the rows themselves are built and written in Python.
- The folder is written beside ``--out`` and moved there in one step (``models.atomic_folder``): a failed
  or killed import leaves no half-written folder. An ``--out`` that holds files is replaced only with
  ``force`` and only when ``vstar import`` wrote it (its ``stats.json`` says so), never with an input inside.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any, cast

import numpy as np
from tqdm import tqdm

from models.atomic_folder import publish, staging_folder
from models.output_path import replaced_folder_problem
from training.data.data_files import DataError, beyond_json_syntax, not_utf8, split_records
from training.data.dataset import SPLITS, Sample
from training.data.dataset_writer import split_ends, split_stats, write_split, written_by
from training.data.item_embed import item_text

MAX_HISTORY = 10  # MiniOneRec's sliding window
IMPORTED = "import"  # stats.json's "dataset" in a folder that vstar import wrote
EVENT_COLUMNS = ("user_id", "item_id", "timestamp")
ITEM_COLUMNS = ("item_id", "title")  # description is optional
MINIONEREC_SPLIT = (Fraction(8, 10), Fraction(1, 10), Fraction(1, 10))
NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")  # float() alone also reads nan, inf, 1_000


@dataclass(frozen=True)
class ImportConfig:
    max_history: int = MAX_HISTORY  # history items per row, the most recent ones
    split: tuple[Fraction, Fraction, Fraction] = MINIONEREC_SPLIT  # shares of train, valid, test
    min_interactions: int = 5  # k-core: users and items with fewer events are dropped (1 keeps every one)

    def __post_init__(self) -> None:
        if self.max_history < 1:
            raise ValueError(f"--max-history must be at least 1, got {self.max_history}")
        if self.min_interactions < 1:
            raise ValueError(f"--min-interactions must be at least 1 (1 filters nothing), got {self.min_interactions}")
        if len(self.split) != 3 or min(self.split) < 0 or sum(self.split) != 1 or self.split[0] == 0:
            raise ValueError(f"--split: three shares (train, valid, test) of at least 0 that sum to 1, train above 0; "
                             f"got {','.join(str(float(s)) for s in self.split)}")  # fmt: skip


def parse_split(text: str) -> tuple[Fraction, Fraction, Fraction]:
    """``--split``'s text (``0.8,0.1,0.1``) as exact fractions; ``ImportConfig`` checks their sum."""
    try:
        shares = tuple(Fraction(part.strip()) for part in text.split(","))
    except (ValueError, ZeroDivisionError):
        shares = ()
    if len(shares) != 3:
        raise ValueError(f"--split must be three numbers (train, valid, test) such as 0.8,0.1,0.1, got {text!r}")
    return shares[0], shares[1], shares[2]


@dataclass
class EventLog:
    """The events of the log, one entry each in file order; users and items by code."""

    users: list[str]  # user code -> the log's user id
    user: np.ndarray  # (E,) int64 user code
    item: np.ndarray  # (E,) int64 item code: its place in the items file
    time: np.ndarray  # (E,) int64 the time's rank among the log's times (equal times, equal ranks)


def _records(path: Path, columns: Sequence[str], what: str, option: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, record) of a CSV or JSON-lines file (by its suffix) whose records hold ``columns``; a file of another
    suffix (a JSON array, a TSV) is a DataError naming ``option`` rather than a CSV without its columns."""
    if path.suffix.lower() not in (".csv", ".jsonl"):
        raise DataError(f"{path}: {option} is a .csv or a .jsonl (JSON lines) file")
    if path.suffix.lower() == ".jsonl":
        yield from _json_lines(path, columns)
        return
    for record, width, line, _ in split_records(path, columns, what):
        if None in record or None in record.values():
            raise DataError(f"{path}:{line}: the row's columns do not match the header's {width}")
        yield line, cast(dict[str, Any], record)  # no None key: every key a column


def _json_lines(path: Path, columns: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with path.open(encoding="utf-8-sig") as f:
            for line, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line}: invalid JSON: {e.msg}") from None
                except (ValueError, RecursionError) as e:
                    raise DataError(f"{path}:{line}: invalid JSON: {beyond_json_syntax(e)}") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{line}: expected a JSON object, got {type(record).__name__}")
                missing = [c for c in columns if c not in record]
                if missing:
                    raise DataError(f"{path}:{line}: missing keys {missing}")
                yield line, record
    except UnicodeDecodeError:
        raise DataError(not_utf8(path)) from None


def _external_id(value: Any, column: str, path: Path, line: int) -> str:
    """A user or item id of an input file: non-empty text (a JSON integer reads as its digits)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise DataError(f"{path}:{line}: {column} must be non-empty text, got {value!r}")
    return _utf8(value, column, path, line)


def _utf8(text: str, column: str, path: Path, line: int) -> str:
    """``text``, if a UTF-8 file can hold it: a JSON escape of half a surrogate pair ("\\ud800") cannot (the
    import stopped as it wrote the CSVs, with an error that named neither the input file nor its line)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{path}:{line}: {column} holds {text[e.start]!r}, half of a UTF-16 surrogate pair (a "
                        "JSON \\u escape without its other half), which no UTF-8 file can hold") from None  # fmt: skip
    return text


def read_items(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(ids, item.json entries) of the items file, in its order; an item named twice is a DataError naming
    the line."""
    first: dict[str, int] = {}
    entries: list[dict[str, Any]] = []
    for line, record in _records(path, ITEM_COLUMNS, "an items file", "--items"):
        item = _external_id(record["item_id"], "item_id", path, line)
        if item in first:
            raise DataError(f"{path}:{line}: item {item!r} appears again (first on line {first[item]})")
        first[item] = line
        entries.append(_item_entry(item, record, path, line))
    if not entries:
        raise DataError(f"{path}: no items")
    return list(first), entries


def _item_entry(item: str, record: dict[str, Any], path: Path, line: int) -> dict[str, Any]:
    """An item's ``item.json`` entry: its title, and its description where it has one (text, or a list of
    paragraphs); one with neither (nothing for ``vstar embed`` to embed) is a DataError."""
    # null (JSON's "no value") reads as none; 0, false or [] are values, of the wrong kind, not "none"
    title, description = (("" if v is None else v) for v in (record["title"], record.get("description")))
    if not isinstance(title, str):
        raise DataError(f"{path}:{line}: title must be text, got {title!r:.60}")
    paragraphs = isinstance(description, list) and all(isinstance(p, str) for p in description)
    if not (isinstance(description, str) or paragraphs):
        raise DataError(f"{path}:{line}: description must be text or a list of paragraphs, got {description!r:.60}")
    for column, texts in (
        ("title", [title]),
        ("description", [description] if isinstance(description, str) else description),
    ):
        for text in texts:
            _utf8(text, column, path, line)
    entry = {"title": title} | ({"description": description} if description else {})
    if not item_text(entry):
        raise DataError(f"{path}:{line}: item {item!r} has neither a title nor a description to embed")
    return entry


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_timestamp(value: Any, path: Path, line: int) -> tuple[int | Fraction, bool]:
    """(seconds, whether it was a date) of a timestamp: epoch seconds (text, or a JSON number), or an ISO 8601
    date. Exact: only the order of the times is used, and a float would tie epoch nanoseconds (1.7e18) that lie
    less than 256 apart, whose events would then fall back to file order."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = repr(value)
    text = value.strip() if isinstance(value, str) else ""
    if NUMBER.fullmatch(text):  # an int where it is one: a Fraction costs several times its parse
        return (int(text) if text.lstrip("+-").isdigit() else Fraction(text)), False
    try:
        date = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in "Zz" and text else text)  # "z" too
    except ValueError:
        raise DataError(f"{path}:{line}: timestamp {value!r} is neither a number (epoch seconds) nor an ISO 8601 "
                        "date (2024-05-01T12:30:00)") from None  # fmt: skip
    since = (date if date.tzinfo else date.replace(tzinfo=UTC)) - EPOCH
    return Fraction(since.days * 86_400 + since.seconds) + Fraction(since.microseconds, 1_000_000), True


def read_events(path: Path, item_code: dict[str, int], items_path: Path, progress: bool = True) -> EventLog:
    """Every event of the log, checked line by line; events that name items ``item_code`` lacks are one error."""
    users: dict[str, int] = {}
    user, item, time = [], [], []
    first_date: tuple[bool, int] | None = None  # (whether the first timestamp was a date, its line)
    unknown: dict[str, int] = {}  # item -> its first line
    unknown_events = 0
    records = _records(path, EVENT_COLUMNS, "an events file", "--events")
    for line, record in tqdm(records, desc="import: events", unit=" events", disable=not progress, leave=False):
        u = _external_id(record["user_id"], "user_id", path, line)
        i = _external_id(record["item_id"], "item_id", path, line)
        seconds, is_date = parse_timestamp(record["timestamp"], path, line)
        if first_date is None:
            first_date = (is_date, line)
        elif is_date != first_date[0]:
            kinds = ("a number", "a date") if first_date[0] else ("a date", "a number")
            raise DataError(f"{path}:{line}: timestamp {record['timestamp']!r} is {kinds[0]}, line {first_date[1]}'s "
                            f"{kinds[1]}: give every timestamp one way")  # fmt: skip
        if i not in item_code:
            unknown.setdefault(i, line)
            unknown_events += 1
            continue
        user.append(users.setdefault(u, len(users)))
        item.append(item_code[i])
        time.append(seconds)
    if unknown:
        name, line = next(iter(unknown.items()))
        raise DataError(
            f"{path}:{line}: item {name!r} is not in {items_path} ({unknown_events} events name {len(unknown)} items "
            "missing there): add them to the items file, or drop their events"
        )
    if not time:
        raise DataError(f"{path}: no events")
    rank = {t: r for r, t in enumerate(sorted(set(time)))}  # exact times as their order, for numpy's sorts
    return EventLog(
        list(users), np.array(user, np.int64), np.array(item, np.int64), np.array([rank[t] for t in time], np.int64)
    )


def k_core(log: EventLog, k: int) -> tuple[np.ndarray, int]:
    """(mask of the events kept, rounds): users and items with fewer than ``k`` kept events are dropped until
    every one left has at least ``k``."""
    keep = np.ones(len(log.time), bool)
    rounds = 0
    while True:
        user_count = np.bincount(log.user[keep], minlength=len(log.users))
        item_count = np.bincount(log.item[keep], minlength=int(log.item.max()) + 1)
        low = keep & ((user_count[log.user] < k) | (item_count[log.item] < k))
        if not low.any():
            return keep, rounds
        keep &= ~low
        rounds += 1


def sequence_rows(
    log: EventLog, keep: np.ndarray, vstar_id: np.ndarray, max_history: int, progress: bool = True
) -> list[Sample]:
    """One row per kept event after its user's first (history: the ``max_history`` events before it), sorted
    by the target's timestamp, ties in file order; ``vstar_id``: item code -> vstar item id."""
    index = np.flatnonzero(keep)  # file order
    order = index[np.lexsort((index, log.time[index], log.user[index]))]  # by user, then time, then file order
    user, item = log.user[order], vstar_id[log.item[order]]
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])  # each user's first event in ``order``
    first = np.repeat(starts, np.diff(np.r_[starts, len(order)]))  # (kept,) the start of each event's user
    targets = np.flatnonzero(np.arange(len(order)) > first)
    targets = targets[np.lexsort((order[targets], log.time[order[targets]]))]  # by target time, then file order
    items, names, starts_at = item.tolist(), [log.users[u] for u in user.tolist()], first.tolist()
    rows = []
    for t in tqdm(targets.tolist(), desc="import: rows", unit=" rows", disable=not progress, leave=False):
        rows.append(Sample(names[t], tuple(items[max(starts_at[t], t - max_history) : t]), items[t]))
    return rows


def split_rows(rows: list[Sample], shares: tuple[Fraction, Fraction, Fraction]) -> dict[str, list[Sample]]:
    """Train, valid, test: the rows (in time order) cut at floor(n * train) and floor(n * (train + valid))."""
    train_end, valid_end = split_ends(len(rows), shares)
    return {"train": rows[:train_end], "valid": rows[train_end:valid_end], "test": rows[valid_end:]}


def out_problem(out: Path, force: bool, inputs: Iterable[Path]) -> str | None:
    """What stops the import from writing ``out`` (a sentence), or None: a new or empty folder, or with
    ``force`` one that ``vstar import`` wrote and that holds none of ``inputs``."""
    if out.exists() and not out.is_dir():
        return f"{out} is a file; --out is the folder to write the data set into"
    problem = replaced_folder_problem(out)
    if problem is not None or not (out.is_dir() and any(out.iterdir())):
        return problem
    if not written_by(out, IMPORTED):
        return f"{out} holds files that vstar import did not write (a data set, a checkpoint?): choose a new --out"
    if not force:
        return (f"{out} exists (an earlier import): pass --force to replace it whole, with what was added to it "
                "since (item_emb.npy, index.json)")  # fmt: skip
    inside = [p for p in inputs if out.resolve() in p.resolve().parents]
    if inside:
        return f"{inside[0]} is inside {out}, which --force replaces: move it elsewhere first"
    return None


def import_log(
    events: Path, items: Path, out: Path, config: ImportConfig, force: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Read, filter, window and split the log, then write the data folder to ``out`` in one step; returns the
    stats written to ``out/stats.json``. ``out`` is checked before anything is read (``out_problem``)."""
    problem = out_problem(out, force, [events, items])
    if problem is not None:
        raise ValueError(f"--out: {problem}")
    ids, entries = read_items(items)
    log = read_events(events, {item: code for code, item in enumerate(ids)}, items, progress)
    named = np.unique(log.item)
    keep, rounds = k_core(log, config.min_interactions)
    kept = np.unique(log.item[keep])  # item codes in the items file's order: vstar ids 0..N-1 follow it
    users_kept = len(np.unique(log.user[keep]))
    dropped = {
        "items_without_events": len(ids) - len(named),
        "k_core_rounds": rounds,
        "events": int(len(keep) - keep.sum()),
        "users": len(log.users) - users_kept,
        "items": len(named) - len(kept),
    }
    if not keep.any():
        raise DataError(f"{events}: no events left after --min-interactions {config.min_interactions} (every user or "
                        "item has fewer events): give a smaller --min-interactions, or import more events")  # fmt: skip
    vstar_id = np.full(len(ids), -1, np.int64)
    vstar_id[kept] = np.arange(len(kept))
    splits = split_rows(sequence_rows(log, keep, vstar_id, config.max_history, progress), config.split)
    empty = [s for s, share in zip(SPLITS, config.split, strict=True) if share > 0 and not splits[s]]
    if empty:
        rows = sum(len(r) for r in splits.values())
        fewer = " or a smaller --min-interactions" if config.min_interactions > 1 else ""
        raise DataError(f"{events}: {rows} rows (one per event after its user's first) leave {', '.join(empty)} "
                        f"without rows at --split {','.join(str(float(s)) for s in config.split)}: import more "
                        f"events{fewer}")  # fmt: skip
    stats = {
        "dataset": IMPORTED,
        "events_file": str(events),
        "items_file": str(items),
        "config": {
            "max_history": config.max_history,
            "split": [float(s) for s in config.split],
            "min_interactions": config.min_interactions,
        },  # fmt: skip
        "read": {"events": len(log.time), "users": len(log.users), "items": len(ids)},
        "dropped": dropped,
        "events": int(keep.sum()),
        "users": users_kept,
        "items": len(kept),
        **split_stats(splits),
    }
    meta = [entries[code] for code in kept.tolist()]
    write_folder(out, meta, [ids[code] for code in kept.tolist()], splits, stats)
    return stats


def write_folder(
    out: Path, meta: list[dict[str, Any]], external: list[str], splits: dict[str, list[Sample]], stats: dict[str, Any]
) -> None:
    """The data folder, written into a staging folder beside ``out`` and then moved onto it in one step."""
    staged = staging_folder(out)
    try:
        (staged / "item.json").write_text(json.dumps({str(i): m for i, m in enumerate(meta)}), encoding="utf-8")
        (staged / "item_map.json").write_text(json.dumps(dict(enumerate(external)), indent=0), encoding="utf-8")
        titles = dict(enumerate(m["title"] for m in meta))
        for split, rows in splits.items():
            write_split(staged / f"{split}.csv", rows, titles, None)
        (staged / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        publish(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
