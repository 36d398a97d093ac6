"""``training.cli.options``: the helpers every training-side command shares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.cli.options import write_json


@pytest.mark.usefixtures("disk_fills_up")
def test_a_json_report_cut_short_leaves_the_earlier_one_whole(tmp_path: Path) -> None:
    """``--json`` onto an earlier result (``vstar eval --json``, a training summary): a write that fails half way
    (a full disk, Ctrl-C) must leave the earlier file as it was, not a truncated JSON in its place."""
    report = tmp_path / "eval.json"
    with open(report, "wb") as f:  # the earlier run's (builtins.open: the disk filled after it)
        f.write(b'{"metrics": {"HR@10": 0.5}}\n')
    with pytest.raises(OSError, match="No space left"):
        write_json(report, {"metrics": {"HR@10": 0.25}, "rows": 463})
    assert json.loads(report.read_text()) == {"metrics": {"HR@10": 0.5}}
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no temporary file left beside it
