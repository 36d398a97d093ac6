"""Output paths are checked before the work whose result they hold."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from models.output_path import output_file_problem, output_folder_problem


def test_a_read_only_file_system_is_named_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert output_file_problem(tmp_path / "new" / "a.json") is None
    real = os.statvfs

    def statvfs(path: os.PathLike[str] | str) -> object:  # tmp_path as if mounted read-only (a :ro volume)
        return SimpleNamespace(f_flag=os.ST_RDONLY) if Path(path) == tmp_path else real(path)

    monkeypatch.setattr(os, "statvfs", statvfs)
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)  # EROFS for W_OK, even as root
    expected = f"cannot write under {tmp_path} (a read-only file system)"
    assert output_file_problem(tmp_path / "new" / "a.json") == expected
    assert output_folder_problem(tmp_path / "run") == expected
