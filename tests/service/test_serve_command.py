"""The child ``vstar serve`` of the demo and of ``vstar bench serve`` runs this project's command wherever it starts."""

from __future__ import annotations

import subprocess
from pathlib import Path

from service.serve_command import serve_command


def test_a_vstar_folder_in_the_working_directory_is_not_imported_as_the_command(tmp_path: Path) -> None:
    # the demo's output folder holds a checkpoint named vstar/; `python -m vstar` run there imported it
    (tmp_path / "vstar").mkdir()
    (tmp_path / "vstar" / "manifest.json").write_text("{}")
    cmd = serve_command(tmp_path / "missing", 1)
    assert cmd[-4:] == ["--checkpoint", str(tmp_path / "missing"), "--port", "1"]
    run = subprocess.run(cmd[:3] + ["--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "Usage: vstar [OPTIONS] COMMAND" in run.stdout, run.stderr[-2000:]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "missing is not a checkpoint folder" in run.stderr, run.stderr[
        -2000:
    ]  # vstar serve's
