"""Balanced residual k-means SIDs: balance, collision resolution, determinism, errors, the ``vstar sids`` command."""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from models.sid_catalog import SidCatalog
from training.cli.commands import register
from training.data.dataset import DataError, load_dataset
from training.data.sid_builder import (
    SidBuildConfig,
    auto_codebook_size,
    balanced_assign,
    balanced_kmeans,
    build_sids,
    load_embeddings,
    resolve_collisions,
    write_index,
)


def blobs(n: int, dim: int = 8, centres: int = 5, seed: int = 0) -> np.ndarray:
    """Unit vectors around a few centres: uneven natural clusters that balancing must even out."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim))
    x = c[rng.integers(centres, size=n) ** 2 % centres] + 0.3 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def emb_dir(tmp_path: Path, emb: np.ndarray) -> Path:
    np.save(tmp_path / "item_emb.npy", emb)
    return tmp_path


def test_balanced_usage_and_no_collisions() -> None:
    n, c = 300, 8
    build = build_sids(blobs(n), SidBuildConfig(codebook_size=c, levels=3))
    # collision resolution never touches the first token; deeper levels give way where prefixes overflow
    assert np.bincount(build.codes[:, 0], minlength=c).max() <= math.ceil(n / c)
    assert len({tuple(r) for r in build.codes.tolist()}) == n
    assert build.report["after"] == {"distinct_sids": n, "collision_rate": 0.0, "items_sharing_a_sid": 0}
    before = build.report["before"]  # 300 items on 8 x 8 two-token prefixes collide before the rule moves them
    assert before["collision_rate"] > 0 and before["distinct_sids"] < n
    assert build.report["moved_items"] >= n - before["distinct_sids"]
    assert [u["level"] for u in build.report["codebook_usage"]] == [1, 2, 3]
    assert all(u["usage"] == 1.0 for u in build.report["codebook_usage"])


def test_balanced_kmeans_caps_every_code() -> None:
    x = blobs(203, centres=3)  # three natural clusters of very different sizes
    centroids, codes = balanced_kmeans(x, 7, iters=20, rng=np.random.default_rng(0))
    counts = np.bincount(codes, minlength=7)
    assert counts.max() <= math.ceil(203 / 7) and (counts > 0).all()
    assert centroids.shape == (7, 8)


@pytest.mark.parametrize("iters", [1, 3, 50])
def test_balanced_kmeans_reports_every_step_once_converged_early_or_not(iters: int) -> None:
    """The progress bar's steps: 1 + iters per level, whether the iterations run out or converge (at 50 they do)."""
    steps: list[int] = []
    plain = balanced_kmeans(blobs(203, centres=3), 7, iters=iters, rng=np.random.default_rng(0))
    told = balanced_kmeans(blobs(203, centres=3), 7, iters=iters, rng=np.random.default_rng(0), done=steps.append)
    assert sum(steps) == 1 + iters and (iters < 50 or len(steps) < 1 + iters)  # at 50 the last report is a jump
    np.testing.assert_array_equal(plain[1], told[1])


def test_deterministic_for_a_seed() -> None:
    emb = blobs(120)
    a, b = build_sids(emb, SidBuildConfig(seed=5)), build_sids(emb, SidBuildConfig(seed=5))
    np.testing.assert_array_equal(a.codes, b.codes)
    assert not np.array_equal(a.codes, build_sids(emb, SidBuildConfig(seed=6)).codes)


def test_balanced_assign_respects_capacity() -> None:
    dist = np.random.default_rng(0).random((50, 6))
    dist[:, 0] -= 1.0  # every row prefers column 0
    codes = balanced_assign(dist, capacity=9)
    assert (codes >= 0).all() and np.bincount(codes).max() <= 9
    np.testing.assert_array_equal(balanced_assign(dist, capacity=50), dist.argmin(1))


# 1-D codebooks (L=2, C=3): level 1 at 0 / 10 / 20, level 2 at 0 / 1 / 2
CODEBOOKS = np.array([[[0.0], [10.0], [20.0]], [[0.0], [1.0], [2.0]]], dtype=np.float32)


def test_resolution_moves_to_the_nearest_free_code_under_the_prefix() -> None:
    x = np.array([[0.95], [1.2], [1.6], [10.0]], dtype=np.float32)
    codes = np.array([[0, 1], [0, 1], [0, 1], [1, 0]])
    resolved, counts = resolve_collisions(codes, x, CODEBOOKS)
    # item 0 fits <0,1> best and keeps it; item 1 (next best) takes the nearest free code 2, item 2 what is left
    assert resolved.tolist() == [[0, 1], [0, 2], [0, 0], [1, 0]]
    assert counts == {"moved_items": 2, "moved_above_last_level": 0}


def test_a_full_prefix_climbs_to_the_nearest_subtree_with_room() -> None:
    x = np.array([[0.95], [1.2], [1.6], [2.5], [10.0]], dtype=np.float32)
    codes = np.array([[0, 1], [0, 1], [0, 1], [0, 1], [1, 0]])
    resolved, counts = resolve_collisions(codes, x, CODEBOOKS)
    # prefix <0> has three SIDs for four items: the worst fit (2.5) goes to the nearest first-level code with room
    assert resolved.tolist() == [[0, 1], [0, 2], [0, 0], [1, 1], [1, 0]]
    assert counts == {"moved_items": 3, "moved_above_last_level": 1}


def test_more_items_than_sids_keep_sharing() -> None:
    x = np.zeros((10, 1), dtype=np.float32)
    resolved, counts = resolve_collisions(np.zeros((10, 2), dtype=np.int64), x, CODEBOOKS)
    assert len({tuple(r) for r in resolved.tolist()}) == 9 and counts["moved_items"] == 8


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60),
    dim=st.integers(1, 6),
    c=st.integers(2, 8),
    levels=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_every_item_gets_a_sid_of_the_right_depth(n: int, dim: int, c: int, levels: int, seed: int) -> None:
    emb = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    config = SidBuildConfig(codebook_size=c, levels=levels, iters=5, seed=seed)
    if c**levels < n:
        with pytest.raises(ValueError, match="codebook too small"):
            build_sids(emb, config)
        return
    build = build_sids(emb, config)
    assert build.codes.shape == (n, levels) and build.codes.min() >= 0 and build.codes.max() < c
    assert np.bincount(build.codes[:, 0]).max() <= math.ceil(n / c)
    catalog = SidCatalog.from_index(build.index())
    assert catalog.num_items == n and catalog.depth == levels
    assert len(catalog.sids) == n, "resolved SIDs are unique whenever C ** levels >= N"


def test_auto_codebook_size() -> None:
    assert [auto_codebook_size(n) for n in (1, 16, 17, 600, 3686, 10**7)] == [4, 4, 8, 32, 64, 256]
    # one level needs a code per item (the default used to be refused there: "use --codebook-size >= 825")
    assert [auto_codebook_size(n, levels) for n, levels in ((825, 1), (825, 2), (10**9, 3), (10**9, 2))] == [
        1024,
        32,
        1024,
        32768,
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"codebook_size": 1}, "codebook size must be 2..65,536 .*, got 1"),
        ({"levels": 0}, r"levels must be in 1\.\.8, got 0"),
        ({"levels": 9}, r"levels must be in 1\.\.8, got 9"),
        ({"iters": 0}, "iters must be at least 1, got 0"),
    ],
)
def test_bad_config(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SidBuildConfig(**kwargs)


def test_codebook_too_small() -> None:
    with pytest.raises(ValueError, match=r"codebook too small: 2\^3 = 8 SIDs for 9 items"):
        build_sids(blobs(9), SidBuildConfig(codebook_size=2))


def test_a_missing_embedding_file_beside_item_json_names_vstar_embed(tmp_path: Path) -> None:
    """vstar import, then vstar sids (the embed step skipped): the error said only that item_emb.npy was missing,
    not which command writes it."""
    (tmp_path / "item.json").write_text(json.dumps({"0": {"title": "a"}, "1": {"title": "b"}}))
    with pytest.raises(DataError, match=f"item_emb.npy: file not found .*: vstar embed --data {tmp_path} --encoder"):
        load_embeddings(tmp_path)


def test_bad_embedding_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"item_emb.npy: file not found"):
        load_embeddings(tmp_path)
    np.save(tmp_path / "item_emb.npy", np.ones(5, dtype=np.float32))
    with pytest.raises(DataError, match=r"shape \(5,\), expected \(items, dim\)"):
        load_embeddings(tmp_path)
    bad = blobs(5)
    bad[2, 1] = np.nan
    np.save(tmp_path / "item_emb.npy", bad)
    with pytest.raises(DataError, match="NaN"):
        load_embeddings(tmp_path)
    np.save(tmp_path / "item_emb.npy", blobs(5))
    (tmp_path / "item.json").write_text(json.dumps({str(i): {"title": "x"} for i in range(4)}))
    with pytest.raises(DataError, match="5 rows but .*item.json has 4 items"):
        load_embeddings(tmp_path)


def test_item_ids_that_are_not_the_rows_are_refused_before_an_index_is_written(tmp_path: Path) -> None:
    """An item.json keyed 1..N beside N rows: the index (keyed by row, 0..N-1) would give item 0, which has no
    entry, row 0's SID and item N none, and the data set would not load (vstar sids wrote it, exit 0)."""
    data = emb_dir(tmp_path, blobs(5))
    (data / "item.json").write_text(json.dumps({str(i): {"title": "x"} for i in range(1, 6)}))
    with pytest.raises(
        DataError, match=r"item.json: the 5 items must have ids 0..4 .* 0 is missing .* largest id is 5"
    ):
        write_index(data, SidBuildConfig())
    assert not (data / "index.json").exists()


def test_write_index_refuses_to_overwrite(tmp_path: Path) -> None:
    data = emb_dir(tmp_path, blobs(40))
    report = write_index(data, SidBuildConfig())
    assert report["out"] == str(data / "index.json")
    first = (data / "index.json").read_text()
    assert len(json.loads(first)) == 40
    with pytest.raises(FileExistsError, match="CSVs .* carry SIDs that must match"):
        write_index(data, SidBuildConfig(seed=1))
    write_index(data, SidBuildConfig(seed=1), force=True)
    assert (data / "index.json").read_text() != first
    write_index(data, SidBuildConfig(), out=data / "alt" / "index.json")
    assert (data / "alt" / "index.json").read_text() == first


def test_an_index_that_others_depend_on_is_never_replaced(tiny_data_dir: Path, tmp_path: Path) -> None:
    """--force alone would leave the splits' SIDs behind the new index; --out may not land on a split, another
    data set's index, a checkpoint's file or a folder. Each is refused before the k-means, and nothing changes."""
    data, other, ckpt = tmp_path / "data", tmp_path / "other", tmp_path / "ckpt"
    shutil.copytree(tiny_data_dir, data)
    shutil.copytree(tiny_data_dir, other)
    ckpt.mkdir()
    (ckpt / "manifest.json").write_text("{}")
    before = {p: p.read_bytes() for folder in (data, other, ckpt) for p in folder.iterdir()}
    with pytest.raises(FileExistsError, match=r"--force alone would replace .*index.json while train.csv, valid.csv"):
        write_index(data, SidBuildConfig(seed=1), force=True)
    for out, message in [
        (data / "train.csv", "exists and is not an index"),
        (other / "index.json", "is a data set .* whose SIDs must match its own index"),
        (ckpt / "manifest.json", "a checkpoint"),
        (ckpt / "index.json", "a checkpoint"),
        (other, "is a folder"),
    ]:
        with pytest.raises(ValueError, match=f"--out: .*{message}"):
            write_index(data, SidBuildConfig(seed=1), out=out, force=True)
    assert {p: p.read_bytes() for folder in (data, other, ckpt) for p in folder.iterdir()} == before


def test_a_first_index_beside_splits_needs_update_splits(tiny_data_dir: Path, tmp_path: Path) -> None:
    """A folder with splits and no index.json yet (vstar import's, whose SID columns are empty, or one whose
    index was removed): vstar sids without --update-splits wrote index.json, exit 0, and the data set then did
    not load (every row's SID disagreed). It is refused before the k-means, and nothing is written."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    (data / "index.json").unlink()
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    with pytest.raises(ValueError, match=r"train.csv, valid.csv, test.csv in .* add --update-splits"):
        write_index(data, SidBuildConfig())
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before
    write_index(data, SidBuildConfig(), update_splits=True)  # the command vstar import suggests
    load_dataset(data)


def test_a_data_folder_that_cannot_take_the_index_is_named_before_the_k_means(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DIR/index.json on a read-only volume: the k-means ran (minutes at a million items), then the write failed
    with an OSError traceback. --out was checked up front; DIR's own index is now too."""
    data = emb_dir(tmp_path, blobs(40))
    real = os.statvfs

    def statvfs(path: os.PathLike[str] | str) -> object:  # as if mounted read-only (a :ro volume)
        return SimpleNamespace(f_flag=os.ST_RDONLY) if Path(path) == data else real(path)

    monkeypatch.setattr(os, "statvfs", statvfs)
    monkeypatch.setattr("training.data.sid_builder.build_sids", None)  # never reached
    with pytest.raises(ValueError, match=f"--data: cannot write under {data} \\(a read-only file system\\)"):
        write_index(data, SidBuildConfig())


def test_update_splits_rewrites_the_sid_columns_to_the_new_index(tiny_data_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    before = load_dataset(data)
    old_test = (data / "test.csv").read_text()
    with pytest.raises(ValueError, match="--update-splits rewrites the splits of"):
        write_index(data, SidBuildConfig(seed=1), out=tmp_path / "index.json", update_splits=True)
    report = write_index(data, SidBuildConfig(seed=1), force=True, update_splits=True)
    assert report["splits_updated"] == [str(data / f"{s}.csv") for s in ("train", "valid", "test")]
    after = load_dataset(data)  # every SID column now matches the new index
    assert after.catalog.sids != before.catalog.sids
    assert {s: after.splits[s] for s in after.splits} == {s: before.splits[s] for s in before.splits}
    assert (data / "test.csv").read_text().splitlines()[0] == old_test.splitlines()[0]
    assert not list(data.glob(".*.tmp*"))
    # a row naming an item the index lacks stops it before anything is written
    index, valid = (data / "index.json").read_text(), (data / "valid.csv").read_text()
    (data / "test.csv").write_text(old_test + "u9,[],x,[],99999,[],<a_0><b_0><c_0>\n")
    with pytest.raises(DataError, match=r"test.csv:\d+: unknown item id 99999 \(not in the new index\)"):
        write_index(data, SidBuildConfig(seed=2), force=True, update_splits=True)
    assert (data / "index.json").read_text() == index and (data / "valid.csv").read_text() == valid


def test_a_failed_write_leaves_the_index_and_every_split_as_they_were(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails on the last split (a full disk) changes no file: index.json and train.csv were replaced
    before test.csv failed, and the data set no longer loaded (index.json was not even replaced in one step)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    written = csv.DictWriter.writerows
    calls: list[int] = []

    def full_disk(writer: csv.DictWriter, rows: list[dict[str, str]]) -> None:
        calls.append(len(rows))
        if len(calls) == 3:  # test.csv, the last split written
            raise OSError(errno.ENOSPC, "No space left on device")
        written(writer, rows)

    monkeypatch.setattr(csv.DictWriter, "writerows", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_index(data, SidBuildConfig(seed=1), force=True, update_splits=True)
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before  # no temporary file left either
    load_dataset(data)


def test_update_splits_keeps_the_files_form_and_names_start_lines(tiny_data_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    crlf = (data / "train.csv").read_bytes()
    assert b"\r\n" in crlf  # what csv.writer writes
    lf = (data / "valid.csv").read_bytes().replace(b"\r\n", b"\n")
    (data / "valid.csv").write_bytes(b"\xef\xbb\xbf" + lf)  # a BOM and LF line ends, as an editor might
    write_index(data, SidBuildConfig(seed=1), force=True, update_splits=True)
    assert b"\r\n" in (data / "train.csv").read_bytes() and b"\r" not in (data / "valid.csv").read_bytes()
    load_dataset(data)
    # a record over several lines (a quoted title with line breaks) is named at the line it starts on
    test = (data / "test.csv").read_text()
    (data / "test.csv").write_text(test + 'u9,[],"a\nlong\ntitle",[],99999,[],\n')
    first = test.count("\n") + 1
    with pytest.raises(DataError, match=f"test.csv:{first}: unknown item id 99999"):
        write_index(data, SidBuildConfig(seed=2), force=True, update_splits=True)
    (data / "test.csv").unlink()
    with pytest.raises(DataError, match="test.csv: file not found"):
        write_index(data, SidBuildConfig(seed=2), force=True, update_splits=True)


def test_cli(tmp_path: Path) -> None:
    app, bench = typer.Typer(), typer.Typer()
    app.add_typer(bench, name="bench")
    register(app, bench)
    data = emb_dir(tmp_path, blobs(64))
    runner = CliRunner()
    ok = runner.invoke(app, ["sids", "--data", str(data), "--codebook-size", "4", "--json", str(tmp_path / "r.json")])
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.stdout)  # the progress bar goes to stderr
    assert report["codebook_size"] == 4 and report["after"]["collision_rate"] == 0.0  # 4^3 SIDs for 64 items: all used
    assert json.loads((tmp_path / "r.json").read_text()) == report
    again = runner.invoke(app, ["sids", "--data", str(data)])
    assert again.exit_code == 2 and "--force" in again.output
    missing = runner.invoke(app, ["sids", "--data", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "item_emb.npy" in missing.output


@pytest.mark.shared_data
def test_real_embeddings(shared_data_dir: Path, tmp_path: Path) -> None:
    """The first 1,000 Industrial embeddings (a copy; ../shared is never written): no collisions left."""
    shutil.copy(shared_data_dir / "item_emb.npy", tmp_path / "full.npy")
    emb = np.load(tmp_path / "full.npy")[:1000]
    build = build_sids(emb, SidBuildConfig(iters=8))
    assert build.report["codebook_size"] == 32
    assert build.report["after"]["collision_rate"] == 0.0
    assert all(u["usage"] > 0.9 for u in build.report["codebook_usage"])


def test_embeddings_whose_distances_overflow_float32_are_refused() -> None:
    """Finite float32 rows of norm 1e19 overflowed k-means++'s squared distances to inf - inf = nan: numpy's
    'Probabilities contain NaN', a traceback. The k-means is scale-free, so the usual scales build as before."""
    with pytest.raises(
        ValueError, match=r"embeddings too large for float32 distances \(a row's norm is 2e\+19, above 1e\+18\)"
    ):
        build_sids(blobs(40) * np.float32(2e19), SidBuildConfig())
    assert build_sids(blobs(40) * np.float32(1e6), SidBuildConfig()).report["after"]["collision_rate"] == 0.0


def test_codebooks_wider_than_the_decoders_take_are_refused_before_k_means() -> None:
    """The trie and the decoders take codes up to 65,535: vstar sids must not write a catalog they refuse."""
    with pytest.raises(ValueError, match=r"codebook size must be 2..65,536"):
        SidBuildConfig(codebook_size=70_000)
    many = np.random.default_rng(0).normal(size=(70_000, 2)).astype(np.float32)
    with pytest.raises(ValueError, match=r"70,000 items at 1 level\(s\) need 131,072 codes a level.*use more --levels"):
        build_sids(many, SidBuildConfig(levels=1))
