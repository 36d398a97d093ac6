"""Output paths are checked before the work whose result they hold."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from models.output_path import output_file_problem, output_folder_problem, replaced_folder_problem


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


def test_a_replaced_folder_inside_a_checkpoint_is_refused_but_not_below_a_plain_one(tmp_path: Path) -> None:
    """vstar rl --out INIT/rl was lost at INIT's next write (vstar fuse, a resumed run: each replaces INIT whole).
    Only the nearest folder above is asked: a manifest.json or index.json further up may be anything's."""
    init = tmp_path / "init"
    init.mkdir()
    (init / "manifest.json").write_text("{}")
    assert "lies inside" in str(replaced_folder_problem(init / "rl"))
    assert "lies inside" in str(replaced_folder_problem(init / "new" / "rl"))  # created inside it
    (init / "runs").mkdir()
    (tmp_path / "index.json").write_text("{}")  # a project's own file further up
    assert replaced_folder_problem(init / "runs" / "rl") is None


def test_an_output_file_is_checked_where_a_link_leads_and_a_device_is_refused(tmp_path: Path) -> None:
    """--json LINK to a checkpoint's config.json replaced that file (the write follows links; the check did
    not), and --json /dev/full replaced the device with a plain file (as root)."""
    checkpoint = tmp_path / "sft"
    checkpoint.mkdir()
    (checkpoint / "manifest.json").write_text("{}")
    (checkpoint / "config.json").write_text("{}")
    link = tmp_path / "out.json"
    link.symlink_to(checkpoint / "config.json")
    problem = output_file_problem(link)
    assert problem is not None and f"(a link to {checkpoint / 'config.json'}) is inside {checkpoint}" in problem
    assert "is not a regular file" in str(output_file_problem(Path("/dev/null")))
    assert output_file_problem(tmp_path / "eval.json") is None
