"""Reading recommendation data sets: the project's folder layout and MiniOneRec's.

Folder layout (``--data DIR``, as ../shared/data/amazon-industrial and ``vstar synth``)::

    train.csv valid.csv test.csv   MiniOneRec's columns
    index.json                     item id -> [SID tokens]
    item.json                      item id -> {"title": ...}
    item_emb.npy                   (items, dim) float32, row i = item i (optional)
    item_map.json                  item id -> the owner's own id, as vstar import writes it (optional)

MiniOneRec's own checkout (``--minionerec-root ROOT --dataset NAME``)::

    ROOT/data/Amazon/{train,valid,test}/NAME*.csv
    ROOT/data/Amazon/index/NAME.index.json, NAME.item.json, NAME.emb-qwen-td.npy

Every row is checked against the index: a row with the wrong number of columns,
an unknown item id, a SID that is not the item's SID in the index, or a bad list
literal is one ``DataError`` naming the file, the line and the problem. The line
is where the record starts: a line cut inside a quoted field makes csv read on
into the next lines, and the error says so. The SID columns are checked, then dropped:
the index is the single source of truth for SIDs. Reading the files themselves
(JSON objects, .npy arrays, CSV records, item ids, list literals) is
``training.data.data_files``; writing a data set, or its split files with a new
index's SIDs, is ``training.data.dataset_writer``.

``item_map.json`` gives the catalog its external ids (``models.sid_catalog``), which checkpoints carry to
the service; checked whole, it is left out of the data's fingerprint, as of ``check_catalog``: no row or
score depends on it (and checkpoints trained on an imported folder before it was read still match their data).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from models.sid_catalog import Item, SidCatalog, external_ids_from_json, external_ids_problem, parse_sid, sid_to_str
from training.data.data_files import (
    DataError,
    parse_item_id,
    parse_list_literal,
    read_embeddings,
    read_json_object,
    split_records,
)

log = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Sample:
    user_id: str
    history: tuple[int, ...]  # item ids, oldest first
    target: int


def rows_fingerprint(rows: Sequence[Sample]) -> str:
    """sha256 over the rows in order (user, history, target): two scores of the same rows share it."""
    h = hashlib.sha256()
    for r in rows:
        h.update(f"{r.user_id}\t{','.join(map(str, r.history))}\t{r.target}\n".encode())
    return h.hexdigest()


@dataclass
class RecDataset:
    name: str
    catalog: SidCatalog
    splits: dict[str, list[Sample]]
    embeddings: np.ndarray | None  # (items, dim) float32, row i = item id i
    files: dict[str, Path] = field(default_factory=dict)

    def samples(self, splits: Sequence[str]) -> list[Sample]:
        out: list[Sample] = []
        for s in splits:
            if s not in self.splits:
                raise ValueError(f"unknown split {s!r}; the data set has {sorted(self.splits)}")
            out.extend(self.splits[s])
        return out

    def fingerprint(self) -> str:
        """sha256 over the data files, to record in checkpoints which data trained them."""
        h = hashlib.sha256()
        for key in sorted(self.files):
            h.update(key.encode())
            h.update(self.files[key].read_bytes())
        return h.hexdigest()

    def content_fingerprint(self) -> str:
        """sha256 over what training reads: each split's rows, each item's SID and the item embeddings; not the
        files' bytes, which change with what no command reads (the title columns, CRLF line endings, a BOM,
        index.json's indentation)."""
        h = hashlib.sha256()
        for name in sorted(self.splits):
            h.update(f"{name}\t{rows_fingerprint(self.splits[name])}\n".encode())
        for item_id, item in sorted(self.catalog.items.items()):
            h.update(f"{item_id}\t{''.join(item.sid)}\n".encode())
        if self.embeddings is not None:
            h.update(np.ascontiguousarray(self.embeddings, dtype=np.float32).tobytes())
        return h.hexdigest()

    def identity(self) -> dict[str, str]:
        """What a checkpoint's manifest records of the data that trained it (``trained``: the same data)."""
        return {"name": self.name, "fingerprint": self.fingerprint(), "content": self.content_fingerprint()}

    def trained(self, recorded: dict[str, Any] | None) -> bool:
        """Whether a manifest's ``data`` (``identity``) names this data: the same files, or, where it records
        their content, the same content (a checkpoint written before the content was recorded needs the files)."""
        recorded = recorded or {}
        if recorded.get("fingerprint") == self.fingerprint():
            return True
        return recorded.get("content") is not None and recorded["content"] == self.content_fingerprint()


class HoldoutRule(Protocol):
    """What ``split_for_training`` reads of a trainer's config (``SFTConfig``, ``RLConfig``, a baseline's)."""

    @property
    def train_splits(self) -> tuple[str, ...]: ...

    @property
    def holdout(self) -> int: ...


@dataclass(frozen=True)
class Holdout:
    """A ``HoldoutRule`` on its own, for callers without a trainer config."""

    train_splits: tuple[str, ...] = ("train",)
    holdout: int = 500


def split_for_training(data: RecDataset, rule: HoldoutRule) -> tuple[list[Sample], list[Sample]]:
    """(training rows, selection rows): the valid split selects; when valid is trained on, its last (most
    recent) ``holdout`` rows are held out of training and select instead. Test is never read."""
    train = data.samples([s for s in rule.train_splits if s != "valid"])
    valid = list(data.splits["valid"])
    if "valid" in rule.train_splits:
        cut = max(len(valid) - rule.holdout, 0)
        return train + valid[:cut], valid[cut:]
    return train, valid


def training_rows(data: RecDataset, rule: HoldoutRule) -> tuple[list[Sample], list[Sample]]:
    """``split_for_training``, with a ``ValueError`` that names the cause when it leaves no row to train on, or
    none of valid when ``--train-splits`` names it (a ``--holdout`` as large as the split)."""
    train, select = split_for_training(data, rule)
    valid, splits = len(data.splits["valid"]), ",".join(rule.train_splits)
    if "valid" in rule.train_splits and valid and rule.holdout >= valid:
        if not train:
            raise ValueError(
                f"no training rows: --holdout {rule.holdout} holds out all {valid} valid rows, and --train-splits "
                f"{splits} has no other rows; give a smaller --holdout"
            )
        fix = (
            f"give a --holdout below {valid} (e.g. --holdout {valid // 2}: the SFT recipe's 2000 is about half of "
            "amazon-industrial's valid split)"
            if valid >= 2  # else the only --holdout below it is 0, which holds nothing out to choose on
            else "one row cannot be split between training and choosing: train on --train-splits train"
        )
        raise ValueError(
            f"no valid rows to train on: --holdout {rule.holdout} holds out all {valid} valid rows, though "
            f"--train-splits {splits} names valid; {fix}"
        )
    if not train:
        raise ValueError(f"no training rows in --train-splits {splits} of {data.name}")
    return train, select


def warn_if_nothing_selects(data: RecDataset, rule: HoldoutRule) -> None:
    """A warning when ``rule`` leaves no selection row though the run is not a refit (valid trained on with
    ``--holdout 0``, which chooses nothing by design): an empty valid.csv, so the last model is kept."""
    refit = "valid" in rule.train_splits and rule.holdout == 0
    if not refit and not split_for_training(data, rule)[1]:
        log.warning("%s: valid.csv has no rows, so no row chooses the kept model: the last one is kept", data.name)


def check_catalog(catalog: SidCatalog, data: RecDataset, option: str) -> None:
    """The checkpoint given by ``option`` was trained on ``data``'s catalog (the same item -> SID map): its
    SIDs would otherwise name other items, and every score would be wrong without a word. External ids are not
    compared: they change no score (a checkpoint written before the folder had its item_map.json still fits)."""
    if catalog.to_index() != data.catalog.to_index():
        raise ValueError(f"{option}: the checkpoint was trained on another catalog than {data.name}: its SIDs differ")


def popular_sids(catalog: SidCatalog, samples: Sequence[Sample], limit: int = 1000) -> list[tuple[str, int]]:
    """(SID, count) of the SIDs most often a training target, most frequent first (ties: catalog order).

    Checkpoints record it; the service answers from it when even the cheapest
    model answer would miss a request's hard latency cap.
    """
    counts = Counter(catalog.sid_index[catalog.sid_of(s.target)] for s in samples)
    ranked = sorted(counts, key=lambda i: (-counts[i], i))[:limit]
    return [(sid_to_str(catalog.sids[i]), counts[i]) for i in ranked]


def parse_splits(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",")]
    if not all(names) or any(s not in SPLITS for s in names):  # an empty entry too: "train,,valid" is a slip
        raise ValueError(f"--train-splits must be a comma list of {SPLITS}, got {text!r}")
    repeated = sorted({s for s in names if names.count(s) > 1})
    if repeated:  # each row would count twice: trained on twice, or counted twice toward the long tail
        raise ValueError(
            f"--train-splits names {', '.join(repeated)} more than once, got {text!r}: give each split once"
        )
    return names


def counted_splits(text: str) -> list[str]:
    """``parse_splits`` of the splits a scored model trained on, whose rows set the long tail (tail_share@10, the
    target segments of ``vstar compare --by target``): never test, whose targets would shape the long tail test is
    scored against."""
    names = parse_splits(text)
    if "test" in names:
        raise ValueError("--train-splits: no model trains on test: name the splits it trained on")
    return names


def load_dataset(data_dir: str | Path) -> RecDataset:
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data folder {root} " + ("is a file, not a folder" if root.exists() else "does not exist"))
    files = {s: root / f"{s}.csv" for s in SPLITS}
    files |= {"index": root / "index.json", "item": root / "item.json"}
    emb, item_map = root / "item_emb.npy", root / "item_map.json"
    data = _load(root.name, files, emb if emb.exists() else None)
    if item_map.exists():
        data.catalog = data.catalog.with_external_ids(read_item_map(item_map, data.catalog))
    return data


def read_item_map(path: Path, catalog: SidCatalog) -> dict[int, str]:
    """``item_map.json`` (item id -> the owner's id) checked against ``catalog``, or a DataError naming the file
    and the problem."""
    data = read_json_object(path)
    try:
        external_ids = external_ids_from_json(data)
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None
    problem = external_ids_problem(external_ids, catalog.items.keys())
    if problem is not None:
        raise DataError(f"{path}: {problem}")
    return external_ids


def load_minionerec(root: str | Path, dataset: str) -> RecDataset:
    base = Path(root) / "data" / "Amazon"
    if not base.is_dir():
        what = "is not a folder" if base.exists() else "does not exist"
        raise DataError(f"{base} {what}: --minionerec-root must be a MiniOneRec checkout")
    files = {s: _minionerec_split_file(base / s, dataset, s) for s in SPLITS}
    files["index"] = base / "index" / f"{dataset}.index.json"
    files["item"] = base / "index" / f"{dataset}.item.json"
    if not files["index"].exists():  # in a MiniOneRec checkout the index comes with the data, never from vstar sids
        found = sorted(p.name for p in (base / "index").glob("*.index.json"))
        names = f"; it holds {', '.join(found[:5])}" if found else ""
        raise DataError(f"{files['index']}: file not found: is --dataset {dataset} the name of its files?{names}")
    emb = base / "index" / f"{dataset}.emb-qwen-td.npy"
    return _load(dataset, files, emb if emb.exists() else None)


def _minionerec_split_file(folder: Path, dataset: str, split: str) -> Path:
    """MiniOneRec's split file of ``dataset``: ``{dataset}.csv`` or ``{dataset}_{k-core}...csv`` (such as
    ``Industrial_and_Scientific_5_2016-10-2018-11.csv``), so that ``Toys`` is not also ``Toys_and_Games``; more
    than one such file is an error naming them, not a silent choice."""
    found = sorted(
        path
        for path in folder.glob(f"{glob.escape(dataset)}*.csv")
        if re.fullmatch(r"(_\d.*)?\.csv", path.name[len(dataset) :], flags=re.DOTALL)
    )
    if not found:
        raise DataError(f"no {folder}/{dataset}.csv or {dataset}_<k-core>...csv for split {split!r}")
    if len(found) > 1:
        names = ", ".join(path.name for path in found)
        raise DataError(f"{folder} holds {len(found)} {split} files of {dataset}: {names}; keep one")
    return found[0]


def _load(name: str, files: dict[str, Path], emb_path: Path | None) -> RecDataset:
    if not files["index"].exists() and files["item"].exists():  # a catalog of items with no SIDs written yet
        raise DataError(
            f"{files['index']}: file not found: vstar sids writes the items' SIDs there from item_emb.npy (which "
            "vstar embed writes from their text, if the folder has none)"
        )
    index = read_json_object(files["index"])
    meta = read_json_object(files["item"])
    for key, sid in index.items():
        if not isinstance(sid, list) or not all(isinstance(token, str) for token in sid):
            raise DataError(f"{files['index']}: item {key}: expected a list of SID tokens, got {sid!r:.60}")
    titles = {}
    for key, value in meta.items():  # {id: {"title": ..., ...}}, as MiniOneRec writes it
        title = value.get("title", "") if isinstance(value, dict) else None
        if not isinstance(title, str):  # str() made a null title "None", and a plain string entry was dropped
            raise DataError(f"{files['item']}: item {key}: expected an object with a text title, got {value!r:.60}")
        if key not in index:
            raise DataError(f"{files['item']}: item {key} is not in {files['index'].name} (another catalog's file?)")
        titles[parse_item_id(key, files["item"], 1)] = title
    if len(titles) < len(index):
        log.warning(
            "%s: %d of %d items have no entry, so no title", files["item"], len(index) - len(titles), len(index)
        )
    try:
        catalog = SidCatalog.from_index(index, titles)
    except ValueError as e:
        raise DataError(f"{files['index']}: {e}") from None
    splits = {s: read_split(files[s], catalog) for s in SPLITS}
    embeddings = None
    if emb_path is not None:
        embeddings = read_embeddings(emb_path, catalog.num_items, str(files["index"]))
        if max(catalog.items) >= catalog.num_items:  # N distinct ids below N are 0..N-1
            missing = min(set(range(catalog.num_items)) - catalog.items.keys())
            raise DataError(
                f"{files['index']}: the {catalog.num_items} items must have ids 0..{catalog.num_items - 1} "
                f"(row i of {emb_path.name} = item i); {missing} is missing and the largest id is {max(catalog.items)}"
            )
        files = files | {"item_emb": emb_path}
    return RecDataset(name, catalog, splits, embeddings, files)


def read_split(path: Path, catalog: SidCatalog) -> list[Sample]:
    return [_read_row(row, width, catalog, path, line, end) for row, width, line, end in split_records(path)]


def _read_row(row: dict[str | None, Any], width: int, catalog: SidCatalog, path: Path, line: int, end: int) -> Sample:
    """One record of a split file; ``line`` is where it starts, ``end`` where csv found its end."""
    fields = [v for k, v in row.items() if k is not None and v is not None] + row.get(None, [])
    if len(fields) != width:
        spans = f" (a quoted field runs from here to line {end}: is a quote unclosed?)" if end > line else ""
        raise DataError(f"{path}:{line}: {len(fields)} columns, the header has {width}{spans}")
    if not row["item_sid"].strip():
        raise DataError(
            f"{path}:{line}: empty item_sid; a new catalog's SID columns are filled by "
            "vstar sids --data DIR --force --update-splits"
        )
    history = [
        parse_item_id(str(v), path, line)
        for v in parse_list_literal(row["history_item_id"], "history_item_id", path, line)
    ]
    target = parse_item_id(row["item_id"], path, line)
    hist_sids = parse_list_literal(row["history_item_sid"], "history_item_sid", path, line)
    if len(hist_sids) != len(history):
        raise DataError(f"{path}:{line}: {len(history)} history ids but {len(hist_sids)} history SIDs")
    for item_id, sid_text in [*zip(history, hist_sids, strict=False), (target, row["item_sid"])]:
        if item_id not in catalog.items:
            raise DataError(f"{path}:{line}: unknown item id {item_id} (not in the index)")
        try:
            sid = parse_sid(str(sid_text), catalog.depth)
        except ValueError as e:
            raise DataError(f"{path}:{line}: {e}") from None
        if sid not in catalog.sid_index:
            raise DataError(f"{path}:{line}: SID {sid_text} is not in the index")
        if sid != catalog.items[item_id].sid:
            expected = "".join(catalog.items[item_id].sid)
            raise DataError(f"{path}:{line}: item {item_id} has SID {sid_text}, the index says {expected}")
    return Sample(row["user_id"], tuple(history), target)


__all__ = [
    "DataError",
    "Item",
    "RecDataset",
    "Sample",
    "load_dataset",
    "load_minionerec",
    "parse_splits",
]
