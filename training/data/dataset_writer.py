"""Writing data sets: a whole folder in the project's layout, and split files relabelled with a new index.

``write_dataset`` writes what ``training.data.dataset.load_dataset`` reads (``vstar synth`` and the tests use
it); ``write_split``, its split file, also writes one with empty SID columns (``vstar import``, before any
index exists). ``relabel_splits`` serves ``vstar sids --update-splits``: it reads and checks every split file
first and returns them staged (``RelabeledSplit``), so that a caller writes none unless all are good; the caller
writes each in full under a temporary name, with its index, and renames them onto the old files only when all are
written (``models.atomic_folder.replacing_files``), so a failed write (a full disk) changes none of them and a
reader sees the old rows or the new ones. Every column but the two SID columns, the rows' order and each file's
line ending stay as they were.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from models.sid_catalog import SidCatalog
from training.data.data_files import COLUMNS, DataError, parse_item_id, parse_list_literal, split_records
from training.data.dataset import SPLITS, Sample


@dataclass(frozen=True)
class RelabeledSplit:
    """A split file's rows with their SID columns taken from a new index, not yet written."""

    path: Path
    header: list[str]
    rows: list[dict[str, str]]
    newline: str  # the file's own line ending, kept

    def write(self, f: BinaryIO) -> None:
        """Write the file's new contents to ``f``: its file of ``replacing_files``, which renames it onto the file."""
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        writer = csv.DictWriter(text, fieldnames=self.header, lineterminator=self.newline)
        writer.writeheader()
        writer.writerows(self.rows)
        text.flush()
        text.detach()  # ``f`` stays open for its owner to close


def relabel_splits(data_dir: Path, index: dict[str, list[str]]) -> list[RelabeledSplit]:
    """The split files of ``data_dir`` with their SID columns (``history_item_sid``, ``item_sid``) from a new
    ``index``; every other column, and the rows' order, stay. Every file is read and checked (columns, item ids
    in the index) here, so that a caller writes none of them unless all are good."""
    sid_text = {int(k): "".join(v) for k, v in index.items()}
    staged: list[RelabeledSplit] = []
    for split in SPLITS:
        path = data_dir / f"{split}.csv"
        rows = []
        for record, width, line, _ in split_records(path):
            if None in record or None in record.values():
                raise DataError(f"{path}:{line}: the row's columns do not match the header's {width}")
            row = {str(k): str(v) for k, v in record.items()}  # every key a column, every value a cell
            history = parse_list_literal(row["history_item_id"], "history_item_id", path, line)
            ids = [parse_item_id(str(v), path, line) for v in [*history, row["item_id"]]]
            unknown = [i for i in ids if i not in sid_text]
            if unknown:
                raise DataError(f"{path}:{line}: unknown item id {unknown[0]} (not in the new index)")
            row["history_item_sid"] = repr([sid_text[i] for i in ids[:-1]])
            row["item_sid"] = sid_text[ids[-1]]
            rows.append(row)
        with path.open("rb") as raw:
            first = raw.readline()  # split_records has read the whole file as UTF-8 already
        newline = "\r\n" if first.endswith(b"\r\n") else "\n"
        header = next(csv.reader([first.decode("utf-8-sig")]))  # every column the file has, in its order
        staged.append(RelabeledSplit(path, header, rows, newline))
    return staged


def write_dataset(
    out: Path,
    catalog: SidCatalog,
    splits: dict[str, list[Sample]],
    meta: dict[int, dict[str, str]],
    embeddings: np.ndarray | None,
) -> None:
    """Write a data set in the folder layout (used by ``vstar synth`` and tests); ``item_map.json`` too when the
    catalog has external ids."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").write_text(json.dumps(catalog.to_index()))
    if catalog.external_ids is not None:
        (out / "item_map.json").write_text(json.dumps({str(k): v for k, v in sorted(catalog.external_ids.items())}))
    (out / "item.json").write_text(json.dumps({str(k): v for k, v in sorted(meta.items())}))
    if embeddings is not None:
        np.save(out / "item_emb.npy", embeddings.astype(np.float32))
    title = {i: m.get("title", "") for i, m in meta.items()}
    sid_text = {i: "".join(catalog.sid_of(i)) for i in catalog.items}
    for split, rows in splits.items():
        write_split(out / f"{split}.csv", rows, title, sid_text)


def write_split(
    path: Path, rows: Sequence[Sample], title: Mapping[int, str], sid_text: Mapping[int, str] | None
) -> None:
    """One split file in MiniOneRec's columns (UTF-8); ``sid_text``: item id -> its SID joined, or None to leave
    the two SID columns empty for ``vstar sids --update-splits`` to fill (a catalog without an index yet)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for s in rows:
            sids = ("", "") if sid_text is None else (repr([sid_text[i] for i in s.history]), sid_text[s.target])
            w.writerow(
                [
                    s.user_id,
                    repr([title[i] for i in s.history]),
                    title[s.target],
                    repr(list(s.history)),
                    s.target,
                    *sids,
                ]
            )


def split_ends(n: int, shares: Sequence[float | Fraction]) -> tuple[int, int]:
    """Where ``n`` rows in time order are cut into train, valid and test, as MiniOneRec's ``int(n * 0.8)`` and
    ``int(n * 0.9)``: floor(n * train) and floor(n * (train + valid)), the shares taken as exact fractions of
    their decimal text (``vstar synth``, ``vstar import``), so 0.8 + 0.1 cuts at 0.9 and not at 0.9000...01."""
    train, valid = (share if isinstance(share, Fraction) else Fraction(str(share)) for share in shares[:2])
    return int(n * train), int(n * (train + valid))  # int() floors a Fraction >= 0


def split_stats(splits: Mapping[str, Sequence[Sample]]) -> dict[str, Any]:
    """The per-split figures of a written data set's ``stats.json`` (``vstar synth``, ``vstar import``)."""
    return {
        "rows": {s: len(rows) for s, rows in splits.items()},
        "mean_history_length": {
            s: round(sum(len(r.history) for r in rows) / max(len(rows), 1), 4) for s, rows in splits.items()
        },
        "distinct_target_items": {s: len({r.target for r in rows}) for s, rows in splits.items()},
    }


def written_by(folder: Path, dataset: str) -> bool:
    """Whether ``folder``'s ``stats.json`` says the command that writes ``dataset`` wrote it (so that command may
    write over it)."""
    try:
        stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(stats, dict) and stats.get("dataset") == dataset
