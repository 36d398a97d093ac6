"""Data loading: the real files load, and malformed input fails with file, line and problem."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from models.sid_catalog import sid_to_str
from training.data.data_files import COLUMNS
from training.data.dataset import (
    DataError,
    Sample,
    check_catalog,
    load_dataset,
    load_minionerec,
    parse_splits,
    popular_sids,
    training_rows,
    warn_if_nothing_selects,
)
from training.data.dataset_writer import write_dataset


def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_row(path: Path, row_index: int, **changes: str) -> None:
    rows = list(csv.DictReader(path.open(newline="")))
    rows[row_index].update(changes)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


def test_tiny_dataset_round_trips(tiny_dataset, tiny_catalog, tiny_data_dir: Path) -> None:
    assert {k: len(v) for k, v in tiny_dataset.splits.items()} == {"train": 200, "valid": 40, "test": 40}
    assert tiny_dataset.catalog.sids == tiny_catalog.sids
    assert tiny_dataset.embeddings is not None and tiny_dataset.embeddings.shape[0] == tiny_catalog.num_items
    np.testing.assert_array_equal(tiny_dataset.embeddings, np.load(tiny_data_dir / "item_emb.npy"))  # row i = item i


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"item_id": "99999"}, "unknown item id 99999"),
        ({"history_item_id": "[1, 2"}, "bad list literal"),
        ({"item_sid": "<a_1><b_2>"}, "malformed SID"),
        ({"item_sid": "<a_99><b_99><c_99>"}, "is not in the index"),
        ({"history_item_id": str(list(range(11)))}, "history SIDs"),
        ({"item_id": "seven"}, "not an integer item id"),
        ({"item_sid": ""}, "empty item_sid; a new catalog's SID columns are filled by vstar sids .* --update-splits"),
    ],
)
def test_bad_rows_name_file_line_and_problem(tiny_data_dir: Path, tmp_path: Path, changes: dict, message: str) -> None:
    data = copy_data(tiny_data_dir, tmp_path / "d")
    rewrite_row(data / "valid.csv", 4, **changes)
    with pytest.raises(DataError, match=message) as err:
        load_dataset(data)
    assert "valid.csv:6" in str(err.value)  # header is line 1, row index 4 is line 6


def cut_line(line: str, how: str) -> str:
    """A malformed form of one CSV line: too few columns, or cut in half inside / after its first quoted field."""
    if how == "two columns":
        return "hello,world"
    quote = line.index('"')
    return line[: quote + 3] if how == "cut inside a quote" else line[: line.index('"', quote + 1) + 2]


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("two columns", r"valid.csv:6: 2 columns, the header has 7$"),
        ("cut inside a quote", r"valid.csv:6: \d+ columns, the header has 7 \(a quoted field runs from here to line "),
        ("cut after a quote", r"valid.csv:6: \d+ columns, the header has 7$"),
    ],
)
def test_a_short_or_cut_line_is_named_at_its_own_line(
    tiny_data_dir: Path, tmp_path: Path, how: str, message: str
) -> None:
    data = copy_data(tiny_data_dir, tmp_path / "d")
    lines = (data / "valid.csv").read_text().splitlines(keepends=True)
    lines[5] = cut_line(lines[5], how) + "\n"  # line 6 of the file
    (data / "valid.csv").write_text("".join(lines))
    with pytest.raises(DataError, match=message):
        load_dataset(data)


def test_a_byte_order_mark_is_not_part_of_the_data(tiny_data_dir: Path, tmp_path: Path, tiny_dataset) -> None:
    """Excel's "CSV UTF-8" and some editors start a file with a BOM; the first column's name stays user_id."""
    data = copy_data(tiny_data_dir, tmp_path / "d")
    for name in ("valid.csv", "index.json", "item.json"):
        (data / name).write_bytes(b"\xef\xbb\xbf" + (data / name).read_bytes())
    loaded = load_dataset(data)
    assert loaded.splits == tiny_dataset.splits and loaded.catalog.sids == tiny_dataset.catalog.sids


def test_a_history_longer_than_csvs_default_field_cap_loads(tiny_dataset, tmp_path: Path) -> None:
    """A row of 8,000 history items (vstar import --max-history 8000) has SID and title cells of over 131,072
    characters, csv's default field cap: it loads (it stopped with 'field larger than field limit')."""
    long = Sample("u-long", tuple(i % tiny_dataset.catalog.num_items for i in range(8000)), 3)
    splits = {s: list(rows) for s, rows in tiny_dataset.splits.items()} | {"train": [long]}
    meta = {i: {"title": item.title} for i, item in tiny_dataset.catalog.items.items()}
    write_dataset(tmp_path / "d", tiny_dataset.catalog, splits, meta, tiny_dataset.embeddings)
    assert len((tmp_path / "d" / "train.csv").read_text()) > 2 * 131_072
    assert load_dataset(tmp_path / "d").splits["train"] == [long]


def test_sid_that_disagrees_with_index(tiny_data_dir: Path, tmp_path: Path, tiny_catalog) -> None:
    data = copy_data(tiny_data_dir, tmp_path / "d")
    rows = list(csv.DictReader((data / "test.csv").open(newline="")))
    other = next(s for s in tiny_catalog.sids if "".join(s) != rows[0]["item_sid"])
    rewrite_row(data / "test.csv", 0, item_sid="".join(other))
    with pytest.raises(DataError, match=r"test.csv:2: item \d+ has SID"):
        load_dataset(data)


def test_missing_file_and_bad_json(tiny_data_dir: Path, tmp_path: Path) -> None:
    data = copy_data(tiny_data_dir, tmp_path / "d")
    (data / "index.json").write_text("{not json")
    with pytest.raises(DataError, match="index.json:1: invalid JSON"):
        load_dataset(data)
    (data / "index.json").write_text('{"0": ["<a_1>", "<b_2>", "<c_3>"], "0": ["<a_1>", "<b_2>", "<c_4>"]}')
    with pytest.raises(DataError, match="index.json: key '0' appears twice in one object"):  # json kept the last
        load_dataset(data)
    (data / "index.json").unlink()
    with pytest.raises(
        DataError, match="index.json: file not found: vstar sids writes the items' SIDs there from item_emb.npy"
    ):
        load_dataset(data)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="train.csv is a file, not a folder"):  # --data given a file
        load_dataset(data / "train.csv")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("item_emb.npy", b"garbage", "item_emb.npy: not a readable .npy array"),
        ("item_emb.npy", b"", "item_emb.npy: not a readable .npy array"),
        ("item_emb.npy", "object", "item_emb.npy: not a readable .npy array"),  # pickled objects
        ("item_emb.npy", "strings", "item_emb.npy: dtype <U1 is not real numbers"),
        ("item_emb.npy", "complex", "item_emb.npy: dtype complex64 is not real numbers"),
        ("item_emb.npy", "nan", "item_emb.npy: contains NaN"),
        ("item_emb.npy", "short", "item_emb.npy: 3 rows but .*index.json has 120 items"),
        ("index.json", b'{"0": 5}', "index.json: item 0: expected a list of SID tokens, got 5"),
        ("index.json", b"\x80\x81", r"index.json:1: not UTF-8 text \(byte 0 of the file: 0x80\)"),
        ("item.json", b"\xff", r"item.json:1: not UTF-8 text \(byte 0 of the file: 0xff\)"),
        ("item.json", b'{"0": 1' + b"0" * 5000 + b"}", "item.json: invalid JSON: an integer of more than 4300 digits"),
        ("item.json", b'{"0": {"title": null}}', "item.json: item 0: expected an object with a text title, got"),
        ("item.json", b'{"0": "a string"}', "item.json: item 0: expected an object with a text title, got 'a string'"),
        ("item.json", b'{"999": {"title": "t"}}', r"item.json: item 999 is not in index.json \(another catalog"),
        ("valid.csv", b"\xff\xfe", r"valid.csv:1: not UTF-8 text \(byte 0 of the file: 0xff\)"),
    ],
)
def test_unreadable_files_are_named(
    tiny_data_dir: Path, tmp_path: Path, name: str, content: object, message: str
) -> None:
    data = copy_data(tiny_data_dir, tmp_path / "d")
    arrays = {
        "object": np.array([{"a": 1}] * 120, dtype=object),
        "strings": np.full((120, 4), "x"),
        "nan": np.full((120, 4), np.nan, dtype=np.float32),
        "complex": np.full((120, 4), 1 + 1j, dtype=np.complex64),
        "short": np.ones((3, 4), dtype=np.float32),
    }
    if isinstance(content, bytes):
        (data / name).write_bytes(content)
    else:
        with (data / name).open("wb") as f:  # np.save refuses nothing, so each bad array is written as it is
            np.lib.format.write_array(f, arrays[str(content)], allow_pickle=True)
    with pytest.raises(DataError, match=message):
        load_dataset(data)


def write_item_map(data: Path, external: dict) -> None:
    (data / "item_map.json").write_text(json.dumps({str(k): v for k, v in external.items()}))


def test_item_map_gives_the_catalog_external_ids(tiny_data_dir: Path, tmp_path: Path, tiny_dataset) -> None:
    """item_map.json (as vstar import writes it) names the items; the data's fingerprint and check_catalog leave
    it out: a checkpoint trained on the folder before it had the file still fits it, and resumes on it."""
    assert tiny_dataset.catalog.external_ids is None
    data = copy_data(tiny_data_dir, tmp_path / "d")
    write_item_map(data, {i: f"B0{i:04d}" for i in range(120)})
    named = load_dataset(data)
    assert named.catalog.external_ids == {i: f"B0{i:04d}" for i in range(120)}
    assert named.catalog.item_of_external_id["B00042"] == 42 and named.splits == tiny_dataset.splits
    assert named.fingerprint() == tiny_dataset.fingerprint()
    check_catalog(tiny_dataset.catalog, named, "--checkpoint")
    check_catalog(named.catalog, tiny_dataset, "--checkpoint")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[]", "item_map.json: expected a JSON object"),
        (b"{", "item_map.json:1: invalid JSON"),
        (b"\xff", r"item_map.json:1: not UTF-8 text \(byte 0 of the file: 0xff\)"),
        (b'{"0": "a", "0": "b"}', "item_map.json: key '0' appears twice in one object"),
        (b'{"1": "a", "01": "b"}', "item_map.json: keys '1' and '01' both name item 1"),
        (b'{"x": "a"}', r"item_map.json: key 'x' is not an item id \(decimal digits\)"),
        ("drop 5", "item_map.json: no entry for item 5 of the catalog's 120 items: every item needs its own id"),
        ("add 120", r"item_map.json: item 120 is not in the catalog \(another catalog's file\?\)"),
        ("empty 3", "item_map.json: item 3: expected its own id as non-empty text, got ''"),
        ("number 3", "item_map.json: item 3: expected its own id as non-empty text, got 3"),
        ("repeat 7", "item_map.json: items 6 and 7 both have the id 'P6': each item needs its own"),
    ],
)
def test_a_bad_item_map_is_named(tiny_data_dir: Path, tmp_path: Path, content: object, message: str) -> None:
    data = copy_data(tiny_data_dir, tmp_path / "d")
    if isinstance(content, bytes):
        (data / "item_map.json").write_bytes(content)
    else:
        external: dict[int, object] = {i: f"P{i}" for i in range(120)}
        how, item = str(content).split()
        changes = {"empty": "", "number": int(item), "repeat": f"P{int(item) - 1}", "add": "P-new"}
        if how == "drop":
            del external[int(item)]
        else:
            external[int(item)] = changes[how]
        write_item_map(data, external)
    with pytest.raises(DataError, match=message):
        load_dataset(data)


def test_item_ids_beside_embeddings_must_be_their_rows(tiny_data_dir: Path, tmp_path: Path) -> None:
    """Row i of item_emb.npy is item i: a catalog of 1-based ids (1..N) beside it is refused in one line (the
    dense reward and --text-init indexed the array by id: a traceback at N, the wrong item's row below it);
    without the array such ids load."""
    data = copy_data(tiny_data_dir, tmp_path / "d")
    index = json.loads((data / "index.json").read_text())
    (data / "index.json").write_text(json.dumps({str(int(k) + 1): v for k, v in index.items()}))
    items = json.loads((data / "item.json").read_text())
    (data / "item.json").write_text(json.dumps({str(int(k) + 1): v for k, v in items.items()}))
    for split in ("train", "valid", "test"):
        path = data / f"{split}.csv"
        rows = list(csv.DictReader(path.open(newline="")))
        for row in rows:
            row["history_item_id"] = str([int(i) + 1 for i in json.loads(row["history_item_id"])])
            row["item_id"] = str(int(row["item_id"]) + 1)
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
    n = len(index)
    with pytest.raises(DataError, match=rf"index.json: the {n} items must have ids 0..{n - 1} \(row i of item_emb.npy"):
        load_dataset(data)
    (data / "item_emb.npy").unlink()
    assert max(load_dataset(data).catalog.items) == n


def test_minionerec_layout(tiny_data_dir: Path, tmp_path: Path) -> None:
    base = tmp_path / "MiniOneRec" / "data" / "Amazon"
    for split in ("train", "valid", "test"):
        (base / split).mkdir(parents=True)
        shutil.copy(tiny_data_dir / f"{split}.csv", base / split / "Toys_5_2016-10-2018-11.csv")
    (base / "index").mkdir()
    shutil.copy(tiny_data_dir / "index.json", base / "index" / "Toys.index.json")
    shutil.copy(tiny_data_dir / "item.json", base / "index" / "Toys.item.json")
    ds = load_minionerec(tmp_path / "MiniOneRec", "Toys")
    assert len(ds.splits["test"]) == 40 and ds.name == "Toys" and ds.embeddings is None
    with pytest.raises(DataError, match="no .* for split"):
        load_minionerec(tmp_path / "MiniOneRec", "Games")
    for name in ("Toys**", "*"):  # a name is no file pattern (an invalid one was a traceback)
        with pytest.raises(DataError, match="no .* for split"):
            load_minionerec(tmp_path / "MiniOneRec", name)
    # a checkout's index comes with its data (vstar sids does not write it): a missing one names what is there
    index = base / "index" / "Toys.index.json"
    index.rename(base / "index" / "Toy.index.json")
    with pytest.raises(DataError, match=r"Toys.index.json: file not found: is --dataset Toys .*; it holds Toy.index"):
        load_minionerec(tmp_path / "MiniOneRec", "Toys")
    (base / "index" / "Toy.index.json").rename(index)
    # another category whose name starts with this one's is not this one's ...
    shutil.copy(tiny_data_dir / "test.csv", base / "test" / "Toys_and_Games_5_2016-10-2018-11.csv")
    assert len(load_minionerec(tmp_path / "MiniOneRec", "Toys").splits["test"]) == 40
    # ... and two files of this one are not chosen between in silence
    shutil.copy(tiny_data_dir / "test.csv", base / "test" / "Toys_5_2014-01-2018-11.csv")
    with pytest.raises(DataError, match=r"holds 2 test files of Toys: Toys_5_2014-01-2018-11.csv, Toys_5_2016-10"):
        load_minionerec(tmp_path / "MiniOneRec", "Toys")


def test_parse_splits() -> None:
    assert parse_splits("train,valid") == ["train", "valid"]
    with pytest.raises(ValueError, match="--train-splits"):
        parse_splits("train,holdout")


def test_a_split_named_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="--train-splits names train more than once, got 'train,valid,train'"):
        parse_splits("train,valid,train")


def test_shared_industrial_loads(shared_dataset) -> None:
    ds = shared_dataset
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 10393, "valid": 4532, "test": 4533}
    assert ds.catalog.num_items == 3686
    shared = [items for items in ds.catalog.items_of_sid if len(items) > 1]
    assert sum(len(i) for i in shared) == 31  # items sharing a SID, per the data set's stats.json
    assert max(len(s.history) for s in ds.splits["test"]) == 10
    assert json.loads((Path(ds.files["index"]).parent / "stats.json").read_text())["items"] == 3686


def test_popular_sids_counts_training_targets_per_sid(tiny_dataset) -> None:
    cat = tiny_dataset.catalog
    a, b = cat.items_of_sid[4][0], cat.items_of_sid[1][0]
    rows = [Sample("u", (1,), a), Sample("v", (2,), b), Sample("w", (3,), a)]
    assert popular_sids(cat, rows) == [(sid_to_str(cat.sids[4]), 2), (sid_to_str(cat.sids[1]), 1)]
    assert popular_sids(cat, rows, limit=1) == [(sid_to_str(cat.sids[4]), 2)]


def test_a_holdout_that_takes_every_training_row_is_named(tiny_dataset) -> None:
    rule = SimpleNamespace(train_splits=("valid",), holdout=10_000)
    with pytest.raises(ValueError, match="--holdout 10000 holds out all 40 valid rows"):
        training_rows(tiny_dataset, rule)
    train, select = training_rows(tiny_dataset, SimpleNamespace(train_splits=("valid",), holdout=10))
    assert len(train) == 30 and len(select) == 10


def test_a_holdout_that_takes_every_valid_row_of_train_and_valid_is_named(tiny_dataset) -> None:
    rule = SimpleNamespace(train_splits=("train", "valid"), holdout=40)  # all 40 valid rows: none trained on
    with pytest.raises(ValueError, match="no valid rows to train on: --holdout 40 holds out all 40 valid rows") as e:
        training_rows(tiny_dataset, rule)
    assert "give a --holdout below 40 (e.g. --holdout 20: " in str(e.value)
    train, select = training_rows(tiny_dataset, SimpleNamespace(train_splits=("train", "valid"), holdout=39))
    assert len(train) == 201 and len(select) == 39
    # a valid split of one row: the only --holdout below 1 is 0, which holds nothing out (sasrec refuses it)
    one = replace(tiny_dataset, splits=tiny_dataset.splits | {"valid": tiny_dataset.splits["valid"][:1]})
    with pytest.raises(ValueError, match="holds out all 1 valid rows.*one row cannot be split between training and "
                       "choosing: train on --train-splits train$"):  # fmt: skip
        training_rows(one, SimpleNamespace(train_splits=("train", "valid"), holdout=1))


def test_an_empty_valid_split_is_warned_of_where_it_should_choose(
    tmp_path, tiny_catalog, tiny_dataset, caplog: pytest.LogCaptureFixture
) -> None:
    """Training with no valid rows to choose on keeps the last model, which a warning says (on train alone, or on
    train and valid with rows held out of an empty valid); a refit (valid trained on, nothing held out) chooses
    nothing by design and is not warned of, nor is a data set with valid rows."""
    from tests.conftest import write_random_dataset

    data = load_dataset(write_random_dataset(tmp_path / "d", tiny_catalog, (50, 0, 5)))
    with caplog.at_level(logging.WARNING):
        warn_if_nothing_selects(data, SimpleNamespace(train_splits=("train",), holdout=0))
        warn_if_nothing_selects(data, SimpleNamespace(train_splits=("train", "valid"), holdout=10))
        warn_if_nothing_selects(data, SimpleNamespace(train_splits=("train", "valid"), holdout=0))
        warn_if_nothing_selects(tiny_dataset, SimpleNamespace(train_splits=("train",), holdout=0))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [f"{data.name}: valid.csv has no rows, so no row chooses the kept model: the last one is kept"] * 2


def test_an_empty_split_file_is_named_as_empty(tiny_data_dir: Path, tmp_path: Path) -> None:
    data = copy_data(tiny_data_dir, tmp_path / "d")
    (data / "train.csv").write_bytes(b"")
    with pytest.raises(DataError, match=r"train.csv: the file is empty; a split file starts with a header of columns"):
        load_dataset(data)


def test_a_column_named_twice_is_named(tiny_data_dir: Path, tmp_path: Path) -> None:
    """A header naming item_id twice (an edited export): csv keeps the last one's cells without a word, and the
    error was '7 columns, the header has 8' on line 2."""
    data = copy_data(tiny_data_dir, tmp_path / "d")
    lines = (data / "valid.csv").read_text().splitlines()
    (data / "valid.csv").write_text("\n".join([lines[0] + ",item_id", *(line + ",0" for line in lines[1:])]) + "\n")
    with pytest.raises(DataError, match=r"valid.csv:1: columns named twice in the header: \['item_id'\]"):
        load_dataset(data)


@pytest.mark.parametrize("item_id", [" 3", "+3", "3_0", "\u0663", "3.0"])
def test_a_split_item_id_is_decimal_digits_as_index_keys_are(tiny_data_dir: Path, tmp_path: Path, item_id: str) -> None:
    """int() alone read " 3", "+3", "3_0" and other scripts' digits as item ids, where index.json's keys must be
    decimal digits: one spelling of an id, everywhere."""
    data = copy_data(tiny_data_dir, tmp_path / "d")
    test = data / "test.csv"
    header, first, *rest = test.read_text().splitlines(keepends=True)
    row = next(csv.DictReader([header, first]))
    fields = list(row.values())
    fields[list(row).index("item_id")] = item_id
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(fields)
    test.write_text(header + buffer.getvalue() + "".join(rest))
    with pytest.raises(DataError, match=rf"test.csv:2: {re.escape(repr(item_id))} is not an integer item id"):
        load_dataset(data)


def test_the_same_rows_catalog_and_embeddings_are_the_same_data_whatever_the_files_bytes(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    """The fingerprint hashed the files' bytes: titles (which no command reads), CRLF line endings, a BOM or
    index.json re-indented made a checkpoint's data 'other data' for vstar fuse and --resume."""
    base = load_dataset(tiny_data_dir)
    recorded = base.identity()
    same = tmp_path / "same"
    shutil.copytree(tiny_data_dir, same)
    for split in ("train", "valid", "test"):
        path = same / f"{split}.csv"
        rows = list(csv.DictReader(path.open(newline="", encoding="utf-8")))
        with path.open("w", newline="", encoding="utf-8-sig") as f:  # a BOM, CRLF, the titles blanked
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\r\n")
            writer.writeheader()
            writer.writerows({**r, "history_item_title": "", "item_title": ""} for r in rows)
    (same / "index.json").write_text(json.dumps(json.loads((same / "index.json").read_text()), indent=3))
    copy = load_dataset(same)
    assert copy.fingerprint() != base.fingerprint() and copy.trained(recorded)
    assert not copy.trained({"fingerprint": base.fingerprint()})  # a checkpoint from before: the files decide
    changed = tmp_path / "changed"
    shutil.copytree(same, changed)
    valid = changed / "valid.csv"
    lines = valid.read_text(encoding="utf-8-sig").splitlines(keepends=True)
    valid.write_text("".join(lines[:-1]), encoding="utf-8")  # one row fewer
    assert not load_dataset(changed).trained(recorded)
