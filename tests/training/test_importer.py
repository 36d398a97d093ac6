"""``vstar import``: MiniOneRec's rule (against a plain reference and against ``vstar synth``'s own split), the
folder the rest of vstar reads (through ``vstar sids`` to ``load_dataset``), one-line errors naming the file and
the line, and an ``--out`` that is never destroyed."""

from __future__ import annotations

import csv
import json
import random
from collections import Counter, defaultdict
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
import typer.main
from typer.testing import CliRunner

import training.data.importer
import vstar
from training.cli.commands import register
from training.data.dataset import SPLITS, DataError, Sample, load_dataset
from training.data.importer import ImportConfig, import_log, out_problem, parse_split
from training.data.synth import SynthConfig, generate

ITEMS = [("SKU-Z", "Unused thing", ""), ("SKU-C", "Drill, cordless", "A drill"), ("SKU-A", "Saw", ""),
         ("SKU-B", "Hammer", "Heavy, steel")]  # fmt: skip
# alice's two events at 2024-01-02 tie (file order decides); bob's and carol's targets at 2024-01-05 tie too
EVENTS = [
    ("alice", "SKU-A", "2024-01-01T00:00:00"),
    ("bob", "SKU-A", "2024-01-01T12:00:00Z"),
    ("alice", "SKU-C", "2024-01-02"),
    ("alice", "SKU-B", "2024-01-02"),
    ("carol", "SKU-B", "2024-01-02"),
    ("bob", "SKU-C", "2024-01-05"),
    ("carol", "SKU-A", "2024-01-05"),
    ("carol", "SKU-C", "2024-01-07T01:00:00+01:00"),
    ("alice", "SKU-A", "2024-01-09"),
    ("bob", "SKU-B", "2024-01-10"),
]
EVERY = ImportConfig(min_interactions=1)


def write_csv(path: Path, header: list[str], rows: list[tuple[Any, ...]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def write_inputs(
    folder: Path, events: list[tuple[Any, ...]] = EVENTS, items: list[tuple[Any, ...]] = ITEMS
) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return (write_csv(folder / "events.csv", ["user_id", "item_id", "timestamp"], events),
            write_csv(folder / "items.csv", ["item_id", "title", "description"], items))  # fmt: skip


def split_rows(out: Path) -> dict[str, list[Sample]]:
    """The rows of an imported folder's split files, read with the csv module (no index yet)."""
    rows = {}
    for split in SPLITS:
        with (out / f"{split}.csv").open(newline="", encoding="utf-8") as f:
            rows[split] = [Sample(r["user_id"], tuple(json.loads(r["history_item_id"])), int(r["item_id"]))
                           for r in csv.DictReader(f)]  # fmt: skip
    return rows


def test_rows_follow_minionerec_rule(tmp_path: Path) -> None:
    events, items = write_inputs(tmp_path)
    stats = import_log(events, items, tmp_path / "out", EVERY, progress=False)
    out = tmp_path / "out"
    # ids follow the items file's order of the items kept; SKU-Z has no event
    assert json.loads((out / "item_map.json").read_text()) == {"0": "SKU-C", "1": "SKU-A", "2": "SKU-B"}
    assert json.loads((out / "item.json").read_text()) == {
        "0": {"title": "Drill, cordless", "description": "A drill"},
        "1": {"title": "Saw"},
        "2": {"title": "Hammer", "description": "Heavy, steel"},
    }
    c, a, b = 0, 1, 2
    rows = [
        Sample("alice", (a,), c),  # 01-02, line 4
        Sample("alice", (a, c), b),  # 01-02, line 5
        Sample("bob", (a,), c),  # 01-05, line 7
        Sample("carol", (b,), a),  # 01-05, line 8
        Sample("carol", (b, a), c),  # 01-07 00:00 UTC
        Sample("alice", (a, c, b), a),
        Sample("bob", (a, c), b),
    ]
    assert split_rows(out) == {"train": rows[:5], "valid": rows[5:6], "test": rows[6:]}  # int(7 * .8), int(7 * .9)
    assert stats["rows"] == {"train": 5, "valid": 1, "test": 1}
    assert stats["dropped"]["items_without_events"] == 1 and stats["items"] == 3
    header = (out / "train.csv").read_text(encoding="utf-8").splitlines()[:2]
    assert header == ["user_id,history_item_title,item_title,history_item_id,item_id,history_item_sid,item_sid",
                      "alice,['Saw'],\"Drill, cordless\",[1],0,,"]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.csv", "items.csv", "out"]  # no staging left


def test_history_keeps_the_most_recent_items(tmp_path: Path) -> None:
    items = [(f"i{n}", f"item {n}", "") for n in range(6)]
    events, items_csv = write_inputs(tmp_path, [("u", f"i{n}", n) for n in range(6)], items)
    import_log(
        events, items_csv, tmp_path / "out", ImportConfig(2, parse_split("1,0,0"), min_interactions=1), progress=False
    )
    rows = [r for split in split_rows(tmp_path / "out").values() for r in split]
    assert [r.history for r in rows] == [(0,), (0, 1), (1, 2), (2, 3), (3, 4)]


def reference(
    events: list[tuple[str, str, int]], items: list[str], config: ImportConfig
) -> tuple[list[str], dict[str, list[Sample]]]:
    """MiniOneRec's rule written plainly: (kept items in the items file's order, splits)."""
    log = [(user, item, t, line) for line, (user, item, t) in enumerate(events)]
    while True:
        users, counts = Counter(e[0] for e in log), Counter(e[1] for e in log)
        kept = [e for e in log if users[e[0]] >= config.min_interactions and counts[e[1]] >= config.min_interactions]
        if len(kept) == len(log):
            break
        log = kept
    named = {e[1] for e in log}
    order = [item for item in items if item in named]
    vstar_id = {item: n for n, item in enumerate(order)}
    by_user = defaultdict(list)
    for e in log:
        by_user[e[0]].append(e)
    timed = []
    for user, seq in by_user.items():
        seq.sort(key=lambda e: (e[2], e[3]))
        for j in range(1, len(seq)):
            history = tuple(vstar_id[e[1]] for e in seq[max(0, j - config.max_history) : j])
            timed.append(((seq[j][2], seq[j][3]), Sample(user, history, vstar_id[seq[j][1]])))
    rows = [r for _, r in sorted(timed, key=lambda r: r[0])]
    a = int(len(rows) * config.split[0])
    b = int(len(rows) * (config.split[0] + config.split[1]))
    return order, {"train": rows[:a], "valid": rows[a:b], "test": rows[b:]}


@pytest.mark.parametrize(("seed", "k", "history"), [(0, 1, 10), (1, 2, 3), (2, 3, 1), (3, 5, 10)])
def test_equals_a_plain_reference(tmp_path: Path, seed: int, k: int, history: int) -> None:
    """Random logs with many tied timestamps and repeated items, k-core over several rounds."""
    rng = random.Random(seed)
    items = [f"sku-{n}" for n in range(40)]
    rng.shuffle(items)
    events = [(f"u{int(rng.paretovariate(0.8)) % 60}", f"sku-{int(rng.paretovariate(1.2)) % 40}", rng.randrange(50))
              for _ in range(600)]  # fmt: skip
    config = ImportConfig(max_history=history, split=parse_split("0.7,0.2,0.1"), min_interactions=k)
    events_csv, items_csv = write_inputs(tmp_path, events, [(i, f"title {i}", "") for i in items])
    stats = import_log(events_csv, items_csv, tmp_path / "out", config, progress=False)
    order, splits = reference(events, items, config)
    assert json.loads((tmp_path / "out" / "item_map.json").read_text()) == {str(n): i for n, i in enumerate(order)}
    assert split_rows(tmp_path / "out") == splits
    assert stats["rows"] == {s: len(r) for s, r in splits.items()}
    if k > 1:  # users and items dropped, over more than one round
        assert stats["dropped"]["k_core_rounds"] >= 2 and min(stats["dropped"][w] for w in ("users", "items")) > 0


def test_k_core_drops_in_rounds(tmp_path: Path) -> None:
    """k = 2: item C has one event (round 1), which leaves u3 with one (round 2); A and B keep two each."""
    log = [("u1", "A", 1), ("u1", "B", 2), ("u2", "A", 3), ("u2", "B", 4), ("u3", "C", 5), ("u3", "A", 6)]
    items = [("A", "a", ""), ("B", "b", ""), ("C", "c", "")]
    events, items_csv = write_inputs(tmp_path, log, items)
    config = ImportConfig(split=parse_split("1,0,0"), min_interactions=2)
    stats = import_log(events, items_csv, tmp_path / "out", config, progress=False)
    assert stats["dropped"] == {"items_without_events": 0, "k_core_rounds": 2, "events": 2, "users": 1, "items": 1}
    assert split_rows(tmp_path / "out")["train"] == [Sample("u1", (0,), 1), Sample("u2", (0,), 1)]


def test_a_log_of_synth_imports_to_synths_own_rows(tmp_path: Path) -> None:
    """``vstar synth`` splits its users' events by the same rule: its rows, written back as a raw log keyed by
    SKUs in a shuffled order, import to the same rows in the same order."""
    data = generate(SynthConfig(items=80, users=60, seed=5))
    timed = sorted(((t, s) for split in SPLITS for s, t in zip(data.splits[split], data.times[split], strict=True)),
                   key=lambda r: r[0])  # fmt: skip
    events, seen = [], set()
    for t, sample in timed:
        if sample.user_id not in seen:  # the user's first event: never a target, any earlier time
            seen.add(sample.user_id)
            events.append((sample.user_id, f"sku-{sample.history[0]}", repr(t - 1.0)))
        events.append((sample.user_id, f"sku-{sample.target}", repr(t)))
    rng = random.Random(0)
    rng.shuffle(events)
    items = [(f"sku-{i}", m["title"], m["description"]) for i, m in data.meta.items()]
    rng.shuffle(items)
    events_csv, items_csv = write_inputs(tmp_path, events, items)
    import_log(events_csv, items_csv, tmp_path / "out", EVERY, progress=False)
    sku = {int(k): v for k, v in json.loads((tmp_path / "out" / "item_map.json").read_text()).items()}
    imported = [r for rows in split_rows(tmp_path / "out").values() for r in rows]
    expected = [s for _, s in timed]
    assert [(r.user_id, [sku[i] for i in r.history], sku[r.target]) for r in imported] == [
        (s.user_id, [f"sku-{i}" for i in s.history], f"sku-{s.target}") for s in expected
    ]


def cli() -> typer.Typer:
    app, bench = typer.Typer(), typer.Typer()
    app.add_typer(bench, name="bench")
    register(app, bench)
    return app


def test_the_readme_flow_loads_with_the_projects_loader(tmp_path: Path) -> None:
    """import -> item_emb.npy (random here; vstar embed in the README) -> vstar sids --update-splits ->
    load_dataset, which reads the rows import wrote."""
    rng = random.Random(1)
    items = [(f"P-{n:04d}", f"product {n}", f"about product {n}") for n in range(30)]
    events = [(f"user{rng.randrange(25)}", f"P-{rng.randrange(30):04d}", f"2023-0{1 + n // 100}-01T00:00:{n % 60:02d}")
              for n in range(400)]  # fmt: skip
    events_csv, items_csv = write_inputs(tmp_path, events, items)
    out = tmp_path / "mine"
    runner = CliRunner()
    result = runner.invoke(cli(), ["import", "--events", str(events_csv), "--items", str(items_csv), "--out", str(out)])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats == json.loads((out / "stats.json").read_text()) | {"out": str(out)}
    assert "--min-interactions 5 dropped" in result.stderr and "vstar sids --data" in result.stderr
    with pytest.raises(DataError, match="index.json: file not found: vstar sids writes"):
        load_dataset(out)  # as a hand-written folder before its SIDs
    emb = np.random.default_rng(0).normal(size=(stats["items"], 8)).astype(np.float32)
    np.save(out / "item_emb.npy", emb / np.linalg.norm(emb, axis=1, keepdims=True))
    sids = runner.invoke(cli(), ["sids", "--data", str(out), "--update-splits"])
    assert sids.exit_code == 0, sids.output
    ds = load_dataset(out)
    assert ds.catalog.num_items == stats["items"] and {s: len(r) for s, r in ds.splits.items()} == stats["rows"]
    assert ds.splits == split_rows(out)
    titles = json.loads((out / "item.json").read_text())
    external = json.loads((out / "item_map.json").read_text())
    assert all(titles[k]["title"] == f"product {int(v[2:])}" for k, v in external.items())
    assert ds.catalog.external_ids == {int(k): v for k, v in external.items()}  # the loader reads the map back


def test_json_lines_and_epoch_seconds(tmp_path: Path) -> None:
    (tmp_path / "items.jsonl").write_text(
        '{"item_id": 7, "title": "Seven", "description": ["one", "two"]}\n\n{"item_id": "8", "title": "Eight"}\n'
    )
    (tmp_path / "events.jsonl").write_text("".join(
        json.dumps({"user_id": u, "item_id": i, "timestamp": t}) + "\n"
        for u, i, t in [("a", 7, 1.5e9), ("a", "8", 1.5e9 + 1), ("b", 8, "1500000000"), ("b", 7, 1.6e9)]
    ))  # fmt: skip
    config = ImportConfig(split=(Fraction(1), Fraction(0), Fraction(0)), min_interactions=1)
    import_log(tmp_path / "events.jsonl", tmp_path / "items.jsonl", tmp_path / "out", config, progress=False)
    assert json.loads((tmp_path / "out" / "item_map.json").read_text()) == {"0": "7", "1": "8"}
    assert json.loads((tmp_path / "out" / "item.json").read_text())["0"]["description"] == ["one", "two"]
    assert split_rows(tmp_path / "out")["train"] == [Sample("a", (0,), 1), Sample("b", (1,), 0)]


@pytest.mark.parametrize(
    ("items", "events", "message"),
    [
        ('{"item_id": "7", "title": "caf\\u00e9 \\ud83d"}', None, r"items.jsonl:1: title holds '\\ud83d', half of"),
        ('{"item_id": "7", "title": "t", "description": ["ok", "\\udc00"]}', None, "items.jsonl:1: description holds"),
        ('{"item_id": "7\\ud800", "title": "t"}', None, "items.jsonl:1: item_id holds"),
        (None, '{"user_id": "\\udfff", "item_id": "7", "timestamp": 1}', "events.jsonl:2: user_id holds"),
    ],
)
def test_half_a_surrogate_pair_is_named_at_its_line(
    tmp_path: Path, items: str | None, events: str | None, message: str
) -> None:
    """JSON can escape half of a UTF-16 surrogate pair, which no UTF-8 file can hold: the import stopped as it
    wrote the CSVs, with 'surrogates not allowed' naming neither the file nor the line. A whole pair is text."""
    good = '{"item_id": "7", "title": "Saw \\ud83d\\ude00"}'
    (tmp_path / "items.jsonl").write_text((items or good) + "\n")
    first = '{"user_id": "a", "item_id": "7", "timestamp": 0}'
    (tmp_path / "events.jsonl").write_text(f"{first}\n{events or first}\n")
    with pytest.raises(DataError, match=message):
        import_log(tmp_path / "events.jsonl", tmp_path / "items.jsonl", tmp_path / "out", EVERY, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("items", "events", "message"),
    [  # 0, false or [] read as "no title" (the title lost without a word), where 1 was refused
        ('{"item_id": "7", "title": 0, "description": "d"}', None, "items.jsonl:1: title must be text, got 0"),
        ('{"item_id": "7", "title": false, "description": "d"}', None, "items.jsonl:1: title must be text, got False"),
        ('{"item_id": "7", "title": "t", "description": 0}', None, "items.jsonl:1: description must be text or a"),
        # a traceback (Python's own limits on what json.loads reads), not a line naming the file
        ('{"item_id": 1' + "0" * 5000 + ', "title": "t"}', None, "items.jsonl:1: invalid JSON: an integer of more"),
        (None, '{"user_id": "a", "item_id": "7", "timestamp": 1' + "0" * 5000 + "}", "events.jsonl:2: invalid JSON"),
        (None, '{"user_id": ' + "[" * 100_000 + "]" * 100_000 + "}", "events.jsonl:2: invalid JSON: arrays and"),
    ],
)
def test_json_values_of_the_wrong_kind_or_past_the_readers_limits_are_named_at_their_line(
    tmp_path: Path, items: str | None, events: str | None, message: str
) -> None:
    (tmp_path / "items.jsonl").write_text((items or '{"item_id": "7", "title": null, "description": "d"}') + "\n")
    first = '{"user_id": "a", "item_id": "7", "timestamp": 0}'
    (tmp_path / "events.jsonl").write_text(f"{first}\n{events or first}\n")
    with pytest.raises(DataError, match=message):
        import_log(tmp_path / "events.jsonl", tmp_path / "items.jsonl", tmp_path / "out", EVERY, progress=False)
    assert not (tmp_path / "out").exists()


BAD_EVENTS = [
    (["user_id", "item", "timestamp"], [("u", "SKU-A", 1)], r"events.csv:1: missing columns \['item_id'\]"),
    (["user_id", " item_id", "Timestamp"], [("u", "SKU-A", 1)],
     r"events.csv:1: missing columns \['item_id', 'timestamp'\]; the header has ' item_id', 'Timestamp': a name must"),
    (["user_id", "item_id", "timestamp"], [("u", "SKU-A", "yesterday")], "events.csv:2: timestamp 'yesterday' is"),
    (["user_id", "item_id", "timestamp"], [("u", "SKU-A", "nan")], "events.csv:2: timestamp 'nan' is neither"),
    (["user_id", "item_id", "timestamp"], [("u", "SKU-A", 1), ("u", "SKU-B", "2024-01-01")],
     "events.csv:3: timestamp '2024-01-01' is a date, line 2's a number"),
    (["user_id", "item_id", "timestamp"], [("u", "SKU-A", 1), ("u", "SKU-X", 2), ("v", "SKU-X", 3), ("v", "S", 4)],
     r"events.csv:3: item 'SKU-X' is not in .*items.csv \(3 events name 2 items missing there\)"),
    (["user_id", "item_id", "timestamp"], [("", "SKU-A", 1)], "events.csv:2: user_id must be non-empty text"),
    (["user_id", "item_id", "timestamp"], [("u", "SKU-A", 1, "extra")], "events.csv:2: the row's columns do not"),
    (["user_id", "item_id", "timestamp", "timestamp"], [("u", "SKU-A", 1, 5), ("u", "SKU-B", 2, 4)],
     r"events.csv:1: columns named twice in the header: \['timestamp'\]"),  # csv read the last one's alone
    (["user_id", "item_id", "timestamp"], [], "events.csv: no events"),
    (["user_id", "item_id", "timestamp"], [("u", "SKU-A", 1), ("u", "SKU-B", 2)],
     "events.csv: no events left after --min-interactions 5"),
]  # fmt: skip


@pytest.mark.parametrize(("sep", "name"), [(";", "semicolon"), ("\t", "tab")])
def test_an_events_csv_separated_otherwise_is_named_so(tmp_path: Path, sep: str, name: str) -> None:
    """A semicolon CSV (Excel's export in many locales) or a TSV saved as .csv: the error listed all three
    columns as missing, which they are not; now it names the separator it found."""
    _, items = write_inputs(tmp_path)
    (tmp_path / "events.csv").write_text(sep.join(("user_id", "item_id", "timestamp")) + "\n" + sep.join("ua1") + "\n")
    with pytest.raises(
        DataError, match=f"events.csv:1: missing columns .*; the header is one column, .*: the file is {name}-separated"
    ):
        import_log(tmp_path / "events.csv", items, tmp_path / "out", ImportConfig(), progress=False)


@pytest.mark.parametrize(("header", "rows", "message"), BAD_EVENTS)
def test_bad_events_name_the_file_and_the_line(
    tmp_path: Path, header: list[str], rows: list[tuple[Any, ...]], message: str
) -> None:
    _, items = write_inputs(tmp_path)
    write_csv(tmp_path / "events.csv", header, rows)
    with pytest.raises(DataError, match=message):
        import_log(tmp_path / "events.csv", items, tmp_path / "out", ImportConfig(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.csv", "items.csv"]


BAD_ITEMS = [
    (
        [("SKU-A", "Saw", ""), ("SKU-A", "Saw again", "")],
        "items.csv:3: item 'SKU-A' appears again \\(first on line 2\\)",
    ),
    ([("SKU-A", "", "")], "items.csv:2: item 'SKU-A' has neither a title nor a description"),
    ([], "items.csv: no items"),
]


@pytest.mark.parametrize(("rows", "message"), BAD_ITEMS)
def test_bad_items_name_the_file_and_the_line(tmp_path: Path, rows: list[tuple[str, ...]], message: str) -> None:
    events, items = write_inputs(tmp_path, items=rows)
    with pytest.raises(DataError, match=message):
        import_log(events, items, tmp_path / "out", EVERY, progress=False)
    (tmp_path / "items.txt").write_text("item_id,title\n")
    with pytest.raises(DataError, match="items.txt: --items is a .csv or a .jsonl"):
        import_log(events, tmp_path / "items.txt", tmp_path / "out", EVERY, progress=False)


def test_an_events_file_of_another_kind_is_named_as_items_is(tmp_path: Path) -> None:
    """A JSON array of events (events.json) was read as a CSV: 'missing columns' at line 1, misleading."""
    _, items = write_inputs(tmp_path)
    (tmp_path / "events.json").write_text(
        json.dumps([dict(zip(("user_id", "item_id", "timestamp"), EVENTS[0], strict=True))])
    )
    with pytest.raises(DataError, match=r"events.json: --events is a .csv or a .jsonl \(JSON lines\) file"):
        import_log(tmp_path / "events.json", items, tmp_path / "out", EVERY, progress=False)


def test_a_split_left_without_rows_is_an_error(tmp_path: Path) -> None:
    events, items = write_inputs(tmp_path, EVENTS[:4])  # one row: alice's second event
    with pytest.raises(
        DataError,
        match=r"2 rows \(one per event after its user's first\) leave valid without rows at --split 0.8,0.1,0.1",
    ):
        import_log(events, items, tmp_path / "out", EVERY, progress=False)
    config = ImportConfig(split=parse_split("1,0,0"), min_interactions=1)  # asked for: empty valid and test files
    assert import_log(events, items, tmp_path / "out", config, progress=False)["rows"] == {"train": 2, "valid": 0,
                                                                                          "test": 0}  # fmt: skip


@pytest.mark.parametrize(
    ("text", "message"),
    [("0.8,0.2", "three numbers"), ("0.8,0.1,x", "three numbers"), ("0.8,0.1,0.2", "sum to 1"),
     ("0,0.5,0.5", "train above 0"), ("1.2,-0.1,-0.1", "of at least 0")],
)  # fmt: skip
def test_bad_split(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImportConfig(split=parse_split(text))


def test_an_out_is_never_destroyed(tmp_path: Path) -> None:
    events, items = write_inputs(tmp_path / "in")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert "vstar import did not write" in str(out_problem(mine, True, [events, items]))
    assert "is a file" in str(out_problem(events, True, [events, items]))
    assert "is a file, so" in str(out_problem(events / "out", False, [events, items]))
    (tmp_path / "empty").mkdir()
    assert out_problem(tmp_path / "empty", False, [events, items]) is None
    out = tmp_path / "out"
    import_log(events, items, out, EVERY, progress=False)
    (out / "item_emb.npy").write_bytes(b"added since")
    assert "pass --force to replace it whole" in str(out_problem(out, False, [events, items]))
    assert out_problem(out, True, [events, items]) is None
    assert "is inside" in str(out_problem(out, True, [out / "events.csv", items]))
    with pytest.raises(ValueError, match="--out: .* pass --force"):
        import_log(events, items, out, EVERY, progress=False)
    with pytest.raises(ValueError, match="--out: .*mine holds files that vstar import did not write"):
        import_log(events, items, mine, EVERY, force=True, progress=False)
    import_log(events, items, out, ImportConfig(max_history=1, min_interactions=1), force=True, progress=False)
    assert not (out / "item_emb.npy").exists()
    assert json.loads((out / "stats.json").read_text())["config"]["max_history"] == 1
    assert (mine / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == [
        "empty", "in", "mine", "out"]  # fmt: skip


def test_an_out_through_a_link_is_written_where_it_points_and_the_current_folder_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events, items = write_inputs(tmp_path / "in")
    (tmp_path / "disk").mkdir()
    link = tmp_path / "data"
    link.symlink_to(tmp_path / "disk", target_is_directory=True)
    import_log(events, items, link, EVERY, progress=False)
    import_log(events, items, link, EVERY, force=True, progress=False)
    assert link.is_symlink() and (tmp_path / "disk" / "stats.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "disk", "in"]
    monkeypatch.chdir(tmp_path / "disk")
    with pytest.raises(ValueError, match=r"^--out: \. holds the current folder"):
        import_log(events, items, Path("."), EVERY, force=True, progress=False)
    assert (tmp_path / "disk" / "stats.json").is_file()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_byte_that_is_not_utf8_is_named_by_its_line_and_its_offset_in_the_file(tmp_path: Path, suffix: str) -> None:
    """Past the reader's first chunk (8 KiB) the decoder's offset counted from that chunk, and no line was named."""
    events = tmp_path / f"events{suffix}"
    rows = [{"user_id": f"u{i}", "item_id": "i1", "timestamp": i} for i in range(600)]
    if suffix == ".csv":
        lines = ["user_id,item_id,timestamp\n"] + [f"{r['user_id']},{r['item_id']},{r['timestamp']}\n" for r in rows]
    else:
        lines = [json.dumps(r) + "\n" for r in rows]
    body = "".join(lines).encode()
    at = len("".join(lines[:500]).encode()) + 1  # in line 501's user id
    events.write_bytes(body[:at] + b"\xe9" + body[at + 1 :])
    _, items = write_inputs(tmp_path / "in")
    with pytest.raises(DataError, match=rf"events{suffix}:501: not UTF-8 text \(byte {at} of the file: 0xe9\)$"):
        import_log(events, items, tmp_path / "out", EVERY, progress=False)


def test_a_failed_write_leaves_the_old_folder_and_no_staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events, items = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    import_log(events, items, out, EVERY, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(training.data.importer, "write_split", full_disk)
    with pytest.raises(OSError, match="No space"):
        import_log(events, items, out, ImportConfig(max_history=1, min_interactions=1), force=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_cli_errors_and_defaults(tmp_path: Path) -> None:
    events, items = write_inputs(tmp_path / "in")
    runner, app = CliRunner(), cli()
    args = ["import", "--events", str(events), "--items", str(items)]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "index.json").write_text("{}")
    refused = runner.invoke(vstar.app, [*args, "--out", str(mine), "--force"])  # the root command's one line
    assert refused.exit_code == 2 and "Error: --out: " in refused.output and "vstar import did not" in refused.output
    bad = runner.invoke(app, [*args, "--out", str(tmp_path / "out"), "--split", "0.5,0.5"])
    assert bad.exit_code == 2 and "--split must be three numbers" in bad.output
    assert not (tmp_path / "out").exists() and (mine / "index.json").read_text() == "{}"
    command = typer.main.get_command(app).commands["import"]
    defaults = {p.name: p.default for p in command.params}
    assert (defaults["max_history"], defaults["min_interactions"]) == (ImportConfig().max_history,
                                                                       ImportConfig().min_interactions)  # fmt: skip
    assert parse_split(defaults["split"]) == ImportConfig().split


def test_a_bad_row_after_blank_lines_is_named_by_its_own_line(tmp_path: Path) -> None:
    """csv skips blank lines: the error named the first blank line, not the row (and split files likewise)."""
    _, items = write_inputs(tmp_path / "in")
    events = tmp_path / "events.csv"
    events.write_text('user_id,item_id,timestamp\nu1,SKU-A,1\n\n\nu1,SKU-B,"not\na time"\n')
    with pytest.raises(DataError, match=r"events.csv:5: timestamp 'not.*a time' is neither"):
        import_log(events, items, tmp_path / "out", EVERY, progress=False)


def test_epoch_nanoseconds_keep_their_order(tmp_path: Path) -> None:
    """Read as floats, times 1.7e18 less than 256 apart tied, and their events fell back to file order."""
    _, items = write_inputs(tmp_path / "in", items=[("A", "Saw", ""), ("B", "Drill", ""), ("C", "Vise", "")])
    events = tmp_path / "events.csv"
    events.write_text(
        "user_id,item_id,timestamp\n"
        "u,B,1700000000000000100\nu,A,1700000000000000001\nu,C,1700000000000000200\n"
        "v,A,1700000000000000300\nv,B,1700000000000000400\n"
    )
    import_log(events, items, tmp_path / "out", ImportConfig(min_interactions=1, split=parse_split("0.34,0.33,0.33")),
               progress=False)  # fmt: skip
    rows = split_rows(tmp_path / "out")
    assert rows["train"] == [Sample("u", (0,), 1)] and rows["valid"] == [Sample("u", (0, 1), 2)]
