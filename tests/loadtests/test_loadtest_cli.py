"""``vstar loadtest``'s failures are one line each, told before any load is sent where they can be (no locust run)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loadtests import runner
from vstar import app

NOTHING_LISTENS = "http://127.0.0.1:1"  # port 1: refused at once


def loadtest(data: Path, out: Path, host: str = NOTHING_LISTENS) -> list[str]:
    return ["loadtest", "--host", host, "--data", str(data), "--out", str(out), "--users", "1", "--duration", "1s"]


def one_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in output, output
    return lines[0]


def test_an_out_that_cannot_be_a_folder_is_refused_before_the_server_is_waited_for(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    file = tmp_path / "file"
    file.write_text("")
    for out, message in ((file, f"{file} is a file, not a folder"), (file / "lt", f"{file} is a file, so")):
        result = CliRunner().invoke(app, loadtest(tiny_data_dir, out))
        assert result.exit_code == 2 and message in one_line(result.output), result.output


def test_a_server_that_never_gets_ready_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tiny_data_dir: Path, tmp_path: Path
) -> None:
    monkeypatch.setattr(runner, "wait_ready", functools.partial(runner.wait_ready, timeout_s=1.0))
    result = CliRunner().invoke(app, loadtest(tiny_data_dir, tmp_path / "lt"))
    line = one_line(result.output)
    assert result.exit_code == 1 and f"{NOTHING_LISTENS}/readyz not ready after 1 s" in line, result.output
    assert "start `vstar serve` there first" in line and not (tmp_path / "lt").exists()


def test_a_bad_row_anywhere_in_the_split_is_named_before_the_server_is_waited_for(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    """Each locust child reads the whole split; a bad last row made every point's users fail to start."""
    data = tmp_path / "data"
    data.mkdir()
    lines = (tiny_data_dir / "test.csv").read_text().splitlines()
    header = lines[0].split(",")
    bad = ["u9" if c == "user_id" else '"[1]"' if c == "history_item_id" else '"x"' for c in header]
    (data / "test.csv").write_text("\n".join([*lines, ",".join(bad)]) + "\n")
    result = CliRunner().invoke(app, loadtest(data, tmp_path / "lt"))
    assert result.exit_code == 2 and f"test.csv:{len(lines) + 1}:" in one_line(result.output), result.output


def test_an_out_with_an_earlier_report_needs_force_and_is_left_untouched(
    monkeypatch: pytest.MonkeyPatch, tiny_data_dir: Path, tmp_path: Path
) -> None:
    def never(host: str) -> None:
        raise AssertionError("the server was waited for")

    monkeypatch.setattr(runner, "wait_ready", never)
    out = tmp_path / "lt"
    (out / "raw").mkdir(parents=True)
    files = {out / "table.md": b"| old |\n", out / "results.json": b"{}\n", out / "raw" / "beam_u32.log": b"old\n"}
    for path, data in files.items():
        path.write_bytes(data)
    result = CliRunner().invoke(app, loadtest(tiny_data_dir, out))
    line = one_line(result.output)
    assert result.exit_code == 2 and f"{out} holds an earlier run's results (raw/, results.json, table.md)" in line
    assert "pass --force to replace them" in line and "or give another --out" in line, line
    assert {p: p.read_bytes() for p in files} == files and sorted(p.name for p in tmp_path.iterdir()) == ["lt"]
    result = CliRunner().invoke(app, [*loadtest(tiny_data_dir, out), "--force"])  # on to the server
    assert result.exit_code == 1 and isinstance(result.exception, AssertionError), result.output


def test_a_mode_named_twice_runs_once(monkeypatch: pytest.MonkeyPatch, tiny_data_dir: Path, tmp_path: Path) -> None:
    """--users is a set; --modes beam,beam ran the point twice, and the second run's raw files replaced the
    first's, so one of the report's two identical rows had nothing behind it."""
    planned = []

    def run_plan(plan: runner.LoadTestPlan, echo: object, force: bool) -> tuple[list, dict]:
        planned.append(plan.modes)
        table = tmp_path / "table.md"
        table.write_text("")
        return [], {"table": table, "plot": table, "json": table}

    monkeypatch.setattr(runner, "run_plan", run_plan)
    result = CliRunner().invoke(app, [*loadtest(tiny_data_dir, tmp_path / "lt"), "--modes", "ved,beam,ved"])
    assert result.exit_code == 0 and planned == [("ved", "beam")], result.output


def test_an_empty_mode_is_refused(tiny_data_dir: Path, tmp_path: Path) -> None:
    """--modes beam,,ved was read as beam,ved: a slip, refused as the other comma lists refuse one."""
    result = CliRunner().invoke(app, [*loadtest(tiny_data_dir, tmp_path / "lt"), "--modes", "beam,,ved"])
    assert result.exit_code == 2 and "--modes must name some of beam, ved (a comma list), got beam,,ved" in one_line(
        result.output
    )
