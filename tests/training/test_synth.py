"""``vstar synth``: layout (load_dataset validates it), determinism, MiniOneRec's time split, hierarchy."""

from __future__ import annotations

import errno
import json
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from training.cli.commands import register
from training.data import dataset_writer
from training.data.dataset import load_dataset
from training.data.dataset_writer import split_ends
from training.data.sid_builder import SidBuildConfig
from training.data.synth import MAX_HISTORY, TAXONOMY, SynthConfig, SynthData, generate, write_synth

SMALL = SynthConfig(items=150, users=80, seed=3)
DATA_FILES = ("train.csv", "valid.csv", "test.csv", "index.json", "item.json", "item_emb.npy", "stats.json")


@pytest.fixture(scope="module")
def small() -> SynthData:
    return generate(SMALL)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synth(out, SMALL)
    return out


def test_loads_with_load_dataset(small_dir: Path) -> None:
    ds = load_dataset(small_dir)
    assert ds.catalog.num_items == SMALL.items
    assert all(len(ds.splits[s]) > 0 for s in ("train", "valid", "test"))
    assert ds.embeddings is not None and ds.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ds.embeddings, axis=1), 1.0, atol=1e-5)
    meta = json.loads((small_dir / "item.json").read_text())
    assert set(meta) == {str(i) for i in range(SMALL.items)}
    for entry in meta.values():
        dept, cat, kind = entry["categories"].split(" > ")
        assert kind in TAXONOMY[dept][cat]
        assert kind in entry["title"] and entry["description"]


def test_deterministic_for_a_seed(tmp_path: Path, small_dir: Path) -> None:
    write_synth(tmp_path / "again", SMALL)
    for name in DATA_FILES:
        assert (tmp_path / "again" / name).read_bytes() == (small_dir / name).read_bytes(), name
    write_synth(tmp_path / "other", SynthConfig(items=150, users=80, seed=4))
    assert (tmp_path / "other" / "train.csv").read_bytes() != (small_dir / "train.csv").read_bytes()


def test_global_time_split(small: SynthData) -> None:
    times = small.times
    for split in ("train", "valid", "test"):
        assert times[split] == sorted(times[split]), f"{split} is not sorted by target time"
    assert max(times["train"]) <= min(times["valid"]) <= max(times["valid"]) <= min(times["test"])
    total = sum(len(v) for v in small.splits.values())
    assert len(small.splits["train"]) == int(0.8 * total)
    assert len(small.splits["train"]) + len(small.splits["valid"]) == int(0.9 * total)  # MiniOneRec's cuts


def test_split_ends_are_minionerecs_cuts() -> None:
    """floor(0.8n) and floor(0.9n), not floor(0.8n) + floor(0.1n) (one row short when n = 19), and exact
    decimal shares: 0.7 + 0.2 cuts 10 rows at 9, where float sums give 8.999..."""
    assert split_ends(19, (0.8, 0.1, 0.1)) == (15, 17)
    assert split_ends(4630, (0.8, 0.1, 0.1)) == (3704, 4167)
    assert split_ends(10, (0.7, 0.2, 0.1)) == (7, 9)
    assert split_ends(10, (Fraction(7, 10), Fraction(2, 10), Fraction(1, 10))) == (7, 9)
    assert split_ends(0, (0.8, 0.1, 0.1)) == (0, 0)


def test_sliding_window_over_each_users_sequence(small: SynthData) -> None:
    """Each user's next sample extends the previous window by its target, cut to the last 10 items."""
    by_user: dict[str, list] = {}
    for split in ("train", "valid", "test"):
        for sample, t in zip(small.splits[split], small.times[split], strict=True):
            by_user.setdefault(sample.user_id, []).append((t, sample))
    for rows in by_user.values():
        rows.sort(key=lambda r: r[0])
        first = rows[0][1]
        assert len(first.history) == 1
        seq = [*first.history, first.target]
        for _, sample in rows[1:]:
            assert 1 <= len(sample.history) <= MAX_HISTORY
            assert sample.history == tuple(seq[-MAX_HISTORY:])
            seq.append(sample.target)
        assert len(seq) == len(set(seq)), "a user repeated an item"
        assert SMALL.min_events <= len(seq) <= SMALL.max_events


def test_embeddings_follow_the_hierarchy(small: SynthData) -> None:
    """Mean cosine similarity falls from same leaf to same category to same department to the rest."""
    emb = small.embeddings
    sim = emb @ emb.T
    path = [small.leaves[j] for j in small.leaf_of]
    off_diag = ~np.eye(len(path), dtype=bool)

    def same(depth: int) -> np.ndarray:
        ids = {prefix: i for i, prefix in enumerate(sorted({p[:depth] for p in path}))}
        keys = np.array([ids[p[:depth]] for p in path])
        return (keys[:, None] == keys[None, :]) & off_diag

    leaf, cat, dept = same(3), same(2), same(1)
    means = [sim[leaf].mean(), sim[cat & ~leaf].mean(), sim[dept & ~cat].mean(), sim[~dept].mean()]
    assert means == sorted(means, reverse=True), means


def test_sids_follow_departments(small: SynthData) -> None:
    """Residual k-means recovers the tree: most first-level codes hold a single department."""
    depts = [small.leaves[j][0] for j in small.leaf_of]
    groups: dict[str, list[str]] = {}
    for item_id, dept in enumerate(depts):
        groups.setdefault(small.catalog.sid_of(item_id)[0], []).append(dept)
    majority = sum(max(g.count(d) for d in set(g)) for g in groups.values())
    assert majority / len(depts) > 0.8
    assert small.sid_report["after"]["collision_rate"] == 0.0


@pytest.mark.parametrize("foreign", ["index.json", "manifest.json", "stats.json"])
def test_refuses_to_clobber_a_foreign_folder_or_a_file(tmp_path: Path, foreign: str) -> None:
    (tmp_path / foreign).write_text("{}")  # a real data set, a checkpoint, stats of something else
    with pytest.raises(ValueError, match="vstar synth did not write"):
        write_synth(tmp_path, SMALL)
    assert [p.name for p in tmp_path.iterdir()] == [foreign] and (tmp_path / foreign).read_text() == "{}"
    with pytest.raises(ValueError, match="is a file"):
        write_synth(tmp_path / foreign, SMALL)


def test_a_failed_write_leaves_the_old_folder_or_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write failing at test.csv (a full disk) left index.json, item.json, the embeddings and two splits but no
    stats.json: the next vstar synth refused the folder as one it did not write; over an earlier data set it left
    a new index beside old splits."""
    written = dataset_writer.write_split

    def full_disk(path: Path, *args: Any) -> None:
        if path.name == "test.csv":
            raise OSError(errno.ENOSPC, "No space left on device")
        written(path, *args)

    monkeypatch.setattr(dataset_writer, "write_split", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_synth(tmp_path / "new", SMALL)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    write_synth(tmp_path / "new", SMALL)
    before = {p.name: p.read_bytes() for p in (tmp_path / "new").iterdir()}
    monkeypatch.setattr(dataset_writer, "write_split", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_synth(tmp_path / "new", replace(SMALL, seed=5), force=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "new").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["new"]


def test_an_out_under_a_file_is_refused_before_the_data_set_is_generated(tmp_path: Path) -> None:
    """It generated the whole data set, then raised NotADirectoryError (a traceback) when writing it."""
    (tmp_path / "notes").write_text("mine")
    with pytest.raises(ValueError, match=r"--out: .*notes is a file, so .*notes/data cannot be written under it"):
        write_synth(tmp_path / "notes" / "data", SMALL)
    assert (tmp_path / "notes").read_text() == "mine"


@pytest.mark.parametrize(("kwargs", "message"), [({"items": 4}, "--items"), ({"users": 0}, "--users")])
def test_bad_config(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SynthConfig(**kwargs)


def test_cli(tmp_path: Path) -> None:
    app, bench = typer.Typer(), typer.Typer()
    app.add_typer(bench, name="bench")
    register(app, bench)
    runner = CliRunner()
    result = runner.invoke(app, ["synth", "--out", str(tmp_path / "d"), "--items", "40", "--users", "20"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["sids"]["items"] == 40
    assert load_dataset(tmp_path / "d").catalog.num_items == 40
    bad = runner.invoke(app, ["synth", "--out", str(tmp_path / "e"), "--items", "3"])
    assert bad.exit_code == 2 and "--items must be at least" in bad.output


def test_a_data_set_of_other_settings_replaces_an_earlier_one_only_with_force(tmp_path: Path) -> None:
    """vstar synth over its own earlier data set regenerated it whatever the settings: another --seed or --items
    replaced, without a word, the data checkpoints had been trained on. The same settings still regenerate it."""
    out = tmp_path / "syn"
    write_synth(out, SMALL)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_synth(out, SMALL)  # the same settings: the same data set, written again
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(ValueError, match=r"holds a synthetic data set of other settings \(seed 3 -> 5\).*--force"):
        write_synth(out, replace(SMALL, seed=5))
    with pytest.raises(ValueError, match=r"other settings \(codebook_size 16 -> 64\)"):  # the SIDs' own settings
        write_synth(out, SMALL, SidBuildConfig(codebook_size=64, seed=3))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    write_synth(out, replace(SMALL, seed=5), force=True)
    assert json.loads((out / "stats.json").read_text())["config"]["seed"] == 5


def test_a_synthetic_data_set_changed_since_is_replaced_only_with_force(tmp_path: Path) -> None:
    """The same settings regenerated the folder whatever it held by then: SIDs rebuilt by vstar sids (which
    checkpoints may have been trained on) went back, and a file of the user's went, without a word."""
    out = tmp_path / "syn"
    write_synth(out, SMALL)
    (out / "notes.txt").write_text("mine")
    index = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps(dict(reversed(list(index.items())))))  # rewritten since
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match=r"syn changed since vstar synth wrote it \(notes.txt, index.json\): pass"):
        write_synth(out, SMALL)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    write_synth(out, SMALL, force=True)
    assert not (out / "notes.txt").exists()
