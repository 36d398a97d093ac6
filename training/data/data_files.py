"""The files of a data folder, read and checked one by one: JSON objects, .npy embeddings, CSV records, item
ids and list literals. Each problem is one ``DataError`` naming the file, and the line where there is one.

``training.data.dataset`` builds a data set from them; ``vstar import``, ``vstar embed`` and ``vstar sids`` read
their inputs with them, so a file is judged the same way by every command.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# csv's default cap, 131,072 characters a field, is below the titles of a long history (vstar import --max-history
# 2000 writes such rows): a field as long as csv can index. Set once, for every reader of the process.
csv.field_size_limit(2**31 - 1)
COLUMNS = ("user_id", "history_item_title", "item_title", "history_item_id", "item_id", "history_item_sid", "item_sid")


class DataError(ValueError):
    """A data file is malformed or inconsistent with the index."""


class _RepeatedKey(Exception):
    pass


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(key)
        out[key] = value
    return out


def not_utf8(path: Path) -> str:
    """The error of a text file that is not UTF-8, naming where: "PATH:LINE: not UTF-8 text (byte B of the file:
    0x..)". A decoding error's own offset counts from the start of the chunk the reader decoded, not the file's;
    lines are the file's own (a byte of a UTF-8 sequence is never a newline, so each decodes alone)."""
    offset = 0
    with path.open("rb") as f:
        for line, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"{path}:{line}: not UTF-8 text (byte {offset + e.start} of the file: {raw[e.start]:#04x})"
            offset += len(raw)
    return f"{path}: not UTF-8 text"  # not reached: the reader that raised read these bytes


def beyond_json_syntax(error: ValueError | RecursionError) -> str:
    """What Python's JSON reader refused in text that is not a syntax error (a ``JSONDecodeError``): an integer
    too long to convert, or arrays and objects nested past the recursion limit."""
    if isinstance(error, RecursionError):
        return "arrays and objects nested deeper than the JSON reader's limit (about 1000 levels)"
    return f"an integer of more than {sys.get_int_max_str_digits()} digits"


def read_json_object(path: Path) -> dict[str, Any]:
    """A data file holding one JSON object (UTF-8), or a DataError naming the file and the problem."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        # a BOM (what some editors write) is not data; a key given twice is refused (json keeps the last, silently)
        data = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=_no_repeated_keys)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except _RepeatedKey as e:
        raise DataError(f"{path}: key {e.args[0]!r} appears twice in one object (which one holds?)") from None
    except UnicodeDecodeError:
        raise DataError(not_utf8(path)) from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path}: invalid JSON: {beyond_json_syntax(e)}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def read_embeddings(path: Path, items: int | None = None, counted_in: str = "the index") -> np.ndarray:
    """(items, dim) float32 item embeddings (row i = item id i) from a .npy file of finite numbers; ``items``:
    the row count that ``counted_in`` gives, when known."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # not .npy, cut short, or pickled objects
        raise DataError(f"{path}: not a readable .npy array ({e})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise DataError(f"{path}: expected one array (.npy), got {type(array).__name__}")
    if array.dtype.kind not in "iuf":  # complex numbers lost their imaginary part in float32, with a warning only
        raise DataError(f"{path}: dtype {array.dtype} is not real numbers (integers or floats)")
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise DataError(f"{path}: shape {array.shape}, expected (items, dim)")
    if items is not None and array.shape[0] != items:
        raise DataError(f"{path}: {array.shape[0]} rows but {counted_in} has {items} items")
    embeddings = array.astype(np.float32)
    if not np.isfinite(embeddings).all():
        raise DataError(f"{path}: contains NaN or infinite values (or values too large for float32)")
    check_embedding_record(path, array.shape)
    return embeddings


def embedding_record(path: Path) -> Path:
    """The record ``vstar embed`` writes beside the embeddings ``path`` (``item_emb.json`` of ``item_emb.npy``)."""
    return path.with_suffix(".json")


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks (an embeddings file may not fit in memory twice)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_embedding_record(path: Path, shape: tuple[int, ...]) -> None:
    """A DataError naming both files when the record beside the embeddings ``path`` (when there is one) describes
    other embeddings: another row count or width, or (``vstar embed`` records it) another file's sha256. The two
    cannot be replaced in one step, so a ``vstar embed --force`` stopped between its two renames leaves a pair
    that disagrees; read as one, the record would name the wrong encoder or the rows the wrong items."""
    record_path = embedding_record(path)
    if not record_path.is_file():
        return
    record = read_json_object(record_path)
    found = {"num_items": shape[0], "dim": shape[1]}
    wrong = [
        f"{key} {record[key]!r} against {found[key]}" for key in found if record.get(key, found[key]) != found[key]
    ]
    if not wrong and "npy_sha256" in record and record["npy_sha256"] != file_sha256(path):
        wrong = [f"npy_sha256 {str(record['npy_sha256'])[:12]}... names another file"]
    if wrong:
        raise DataError(
            f"{path} and {record_path} disagree ({'; '.join(wrong)}): the record describes other embeddings, "
            f"as when vstar embed --force stops between writing the two; run it again (or delete {record_path.name} "
            f"if {path.name} was replaced on purpose)"
        )


def parse_item_id(value: str, path: Path, line: int) -> int:
    """An item id of a data file (decimal digits, as index.json's keys), or a DataError naming the file and the
    line: ``int`` alone also reads " 44 ", "+44", "4_4" and other scripts' digits ("٤٤")."""
    if not isinstance(value, str) or not re.fullmatch(r"[0-9]+", value):
        raise DataError(f"{path}:{line}: {value!r} is not an integer item id (decimal digits)")
    return int(value)


def parse_list_literal(value: str, column: str, path: Path, line: int) -> list[Any]:
    """A split file's list column (a Python list literal, as MiniOneRec writes it), or a DataError."""
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise DataError(f"{path}:{line}: column {column}: bad list literal {value[:60]!r}") from None
    if not isinstance(parsed, list):
        raise DataError(f"{path}:{line}: column {column}: expected a list, got {type(parsed).__name__}")
    return parsed


SEPARATORS = {";": "semicolon", "\t": "tab", "|": "pipe"}  # what a CSV export uses where it does not use commas


def missing_columns_hint(header: list[str], missing: list[str]) -> str:
    """Why a header lacks ``missing`` when that can be seen: a separator other than the comma (the whole line
    read as one column), or a name that differs in case or spaces; else ""."""
    separator = [name for sep, name in SEPARATORS.items() if len(header) == 1 and sep in header[0]]
    if separator:  # a semicolon CSV (Excel's export in many locales) or a TSV saved as .csv
        return (
            f"; the header is one column, {header[0][:60]!r}: the file is {separator[0]}-separated, and a CSV "
            "here must be comma-separated: save it with commas"
        )
    near = {h.strip().lower(): h for h in header}  # " item_id" or "Item_ID": named, but not exactly
    named = [repr(near[c]) for c in missing if c in near]
    return f"; the header has {', '.join(named)}: a name must match exactly (case, spaces)" if named else ""


def _breaks(cell: Any) -> int:
    """Line breaks inside a record's cell (a quoted field's, or the list of cells past the header's width)."""
    if isinstance(cell, list):
        return sum(map(_breaks, cell))
    if not isinstance(cell, str):
        return 0
    return cell.count("\n") + cell.count("\r") - cell.count("\r\n")


def split_records(
    path: Path, columns: Sequence[str] = COLUMNS, what: str = "a split file"
) -> Iterator[tuple[dict[str | None, Any], int, int, int]]:
    """The records of a split file (or another CSV, ``what``, that must hold ``columns``) as (row, the header's
    width, the line it starts on, the line csv ended it on), after checking the header's columns; an unreadable
    file is a DataError naming it and the line."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    line = 2  # where the next record starts: csv's line_num is where the last one ended
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # Excel's "CSV UTF-8" starts with a BOM
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            if not header:
                raise DataError(f"{path}: the file is empty; {what} starts with a header of columns {tuple(columns)}")
            missing = [c for c in columns if c not in header]
            if missing:
                raise DataError(f"{path}:1: missing columns {missing}{missing_columns_hint(header, missing)}")
            repeated = sorted({c for c in header if header.count(c) > 1})
            if repeated:  # csv keeps the last one's cells without a word
                raise DataError(f"{path}:1: columns named twice in the header: {repeated}; name each column once")
            for row in reader:  # csv skips blank lines: a record starts where it ends, less the breaks it holds
                line = reader.line_num - sum(map(_breaks, row.values()))
                yield row, len(header), line, reader.line_num
                line = reader.line_num + 1
    except UnicodeDecodeError:
        raise DataError(not_utf8(path)) from None
    except csv.Error as e:  # e.g. a quote still open at the end of the file
        raise DataError(f"{path}:{line}: {e}") from None
