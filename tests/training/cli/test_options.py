"""``training.cli.options``: the helpers every training-side command shares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from training.cli.options import write_json
from vstar import app


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


@pytest.mark.parametrize("command", ["sft", "rl"])
def test_epochs_beside_max_steps_is_refused_before_any_work(command: str, tmp_path: Path) -> None:
    """``--max-steps`` sets an SFT or RL run's length in place of ``--epochs``: given both, the run silently
    ignored ``--epochs`` (where ``vstar baseline`` stops at whichever ends first); now it is told, before the data
    or the checkpoint is read."""
    init = ["--init", str(tmp_path / "init")] if command == "rl" else []
    out = tmp_path / "out"
    args = [command, *init, "--data", str(tmp_path / "data"), "--out", str(out), "--epochs", "3", "--max-steps", "5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--max-steps 5 sets the run's length in place of --epochs" in lines[0], result.output
    assert not out.exists() and "Traceback" not in result.output


def test_max_steps_alone_and_epochs_alone_are_taken(tmp_path: Path) -> None:
    """Either one is a run's length: the check refuses only the two together (the data check comes next)."""
    where = ["--data", str(tmp_path / "gone"), "--out", str(tmp_path / "o")]
    for length in (["--epochs", "3"], ["--max-steps", "5"]):
        result = CliRunner().invoke(app, ["sft", *where, *length])
        assert result.exit_code == 2 and "data folder" in result.output and "gone does not exist" in result.output
