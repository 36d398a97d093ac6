"""``vstar compare --by``: the paired comparison within segments of the scored rows
(``training.evaluation.segments``)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from training.data.dataset import RecDataset, rows_fingerprint
from training.evaluation.compare import METRICS, MIN_SEGMENT_ROWS, compare_runs, paired_bootstrap
from training.evaluation.segments import history_segment, row_segments, scored_rows, segmenter
from vstar import app


def eval_file(path: Path, ranks: list[int | None], **recorded: str) -> Path:
    payload = {"metrics": dict.fromkeys(METRICS, 0.0), "rows": len(ranks), "target_ranks": ranks} | recorded
    path.write_text(json.dumps(payload))
    return path


def test_history_buckets() -> None:
    names = [history_segment(n) for n in (0, 1, 2, 3, 4, 6, 7, 10, 11, 50)]
    assert names == [
        "history 0", "history 1", "history 2-3", "history 2-3", "history 4-6", "history 4-6",
        "history 7-10", "history 7-10", "history 11+", "history 11+",
    ]  # fmt: skip


def test_the_scored_rows_are_the_split_its_first_or_its_last_rows(tiny_dataset: RecDataset) -> None:
    """As vstar eval scores them whole, with --limit N or with --holdout N; anything else is refused."""
    test = tiny_dataset.splits["test"]
    for rows in (test, test[:7], test[-9:]):
        assert scored_rows(tiny_dataset, "test", len(rows), rows_fingerprint(rows)) == list(rows)
    with pytest.raises(ValueError, match=r"none of its whole 40 rows, its first 5 or its last 5"):
        scored_rows(tiny_dataset, "test", 5, rows_fingerprint(test[3:8]))
    with pytest.raises(ValueError, match="record no rows_fingerprint"):
        scored_rows(tiny_dataset, "test", 5, None)
    assert scored_rows(tiny_dataset, "test", len(test), None) == list(test)
    with pytest.raises(ValueError, match="split 'holdout', which the data set has not"):
        scored_rows(tiny_dataset, "holdout", 5, None)


def test_target_segments_count_popularity_as_tail_share_does(tiny_dataset: RecDataset) -> None:
    rows = tiny_dataset.splits["test"]
    names = row_segments(tiny_dataset, rows, "target", ["train"])
    counts: Counter[int] = Counter()
    for s in tiny_dataset.splits["train"]:
        counts.update([*s.history, s.target])
    head = {i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: round(0.2 * 120)]}
    for row, name in zip(rows, names, strict=True):
        want = "unseen" if not counts[row.target] else "head" if row.target in head else "tail"
        assert name == f"target {want}"


def test_each_segment_is_the_comparison_of_its_rows_alone(tiny_dataset: RecDataset, tmp_path: Path) -> None:
    """Within a segment the figures are paired_bootstrap's over its rows, with the same draws' seed; a segment
    under MIN_SEGMENT_ROWS is listed with its size and no figures."""
    rows = tiny_dataset.samples(["train"])[:200]
    fingerprint = rows_fingerprint(tiny_dataset.splits["train"][:200])
    rng = np.random.default_rng(0)
    base, other = rng.integers(-1, 12, size=200), rng.integers(-1, 12, size=200)
    recorded = {"split": "train", "rows_fingerprint": fingerprint}
    a = eval_file(tmp_path / "a.json", [None if r < 0 else int(r) for r in base], **recorded)
    b = eval_file(tmp_path / "b.json", [None if r < 0 else int(r) for r in other], **recorded)
    out = compare_runs([a], [b], samples=300, seed=4, by=segmenter(tiny_dataset, "history", ["train"]))
    segments = out["segments"]["segments"]
    names = [history_segment(len(r.history)) for r in rows]
    assert sum(block["rows"] for block in segments.values()) == 200 and list(segments) == sorted(
        segments, key=lambda n: int(n.split()[1].split("-")[0].rstrip("+"))
    )
    for name, block in segments.items():
        index = [i for i, n in enumerate(names) if n == name]
        assert block["rows"] == len(index)
        if len(index) < MIN_SEGMENT_ROWS:
            assert block["metrics"] is None
            continue
        assert block["metrics"] == paired_bootstrap(base[None, index], other[None, index], METRICS, 300, 4)
    assert out["metrics"] == paired_bootstrap(base[None], other[None], METRICS, 300, 4)  # the whole split as before


def test_cli_by_needs_data_and_names_unreadable_rows(tiny_data_dir: Path, tmp_path: Path) -> None:
    a = eval_file(tmp_path / "a.json", [0, 1, None], split="test", rows_fingerprint="0" * 64)
    args = ["compare", "--base", str(a), "--other", str(a)]
    result = CliRunner().invoke(app, [*args, "--by", "history"])
    assert result.exit_code == 2 and "--by and --data go together" in result.output
    result = CliRunner().invoke(app, [*args, "--by", "history", "--data", str(tiny_data_dir)])
    assert result.exit_code == 2 and "is --data the data set they scored?" in result.output
    result = CliRunner().invoke(app, [*args, "--by", "colour", "--data", str(tiny_data_dir)])
    assert result.exit_code == 2 and "colour" in result.output
    for splits, message in (
        ("train,test", "no model trains on test"),
        (",", "must be a comma list"),
        ("train,,valid", "must be a comma list"),  # was read as train,valid
    ):
        # as vstar eval's: test's own targets would count toward its head and tail, none at all made every row unseen
        by_target = [*args, "--by", "target", "--data", str(tiny_data_dir), "--train-splits", splits]
        result = CliRunner().invoke(app, by_target)
        assert result.exit_code == 2 and message in result.output, result.output
    for ignored in ([], ["--by", "history", "--data", str(tiny_data_dir)]):  # it was taken and ignored
        result = CliRunner().invoke(app, [*args, *ignored, "--train-splits", "train,valid"])
        assert result.exit_code == 2 and "--train-splits is read by --by target alone" in result.output, result.output
