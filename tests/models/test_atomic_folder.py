"""Folder replacement: one-step swap on Linux, the two-rename path's window closed by the next write."""

from __future__ import annotations

import errno
import io
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from models import atomic_folder
from models.atomic_folder import (
    leftovers,
    publish,
    put_back,
    remove_leftovers,
    replacing_file,
    replacing_files,
    staging_folder,
    write_file,
)


def folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "file").write_text(text)
    return path


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2 is Linux's")
def test_exchange_swaps_two_folders_in_one_step(tmp_path: Path) -> None:
    a, b = folder(tmp_path / "a", "A"), folder(tmp_path / "b", "B")
    assert atomic_folder._exchange(a, b)
    assert (a / "file").read_text() == "B" and (b / "file").read_text() == "A"


def test_publish_replaces_and_leaves_nothing_beside(tmp_path: Path) -> None:
    target = folder(tmp_path / "ck", "old")
    staged = staging_folder(target)
    (staged / "file").write_text("new")
    publish(staged, target)
    assert (target / "file").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_two_rename_window_is_closed_by_the_next_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the swap is refused, a kill between the renames leaves the old folder aside; the next write
    puts it back before anything else, so it is never lost."""
    monkeypatch.setattr(atomic_folder, "_exchange", lambda a, b: False)
    target = folder(tmp_path / "ck", "old")
    os.replace(target, tmp_path / ".ck.old-killed")  # the first rename, then the kill
    folder(tmp_path / ".ck.tmp-killed", "half")
    assert [p.name for p in leftovers(target)] == [".ck.old-killed", ".ck.tmp-killed"]
    remove_leftovers(target)
    assert (target / "file").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["ck"]
    staged = staging_folder(target)
    (staged / "file").write_text("new")
    publish(staged, target)
    assert (target / "file").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_of_several_folders_set_aside_the_newest_is_put_back(tmp_path: Path) -> None:
    """Two killed writes, each between its renames: the later one set aside the newer checkpoint."""
    older = folder(tmp_path / ".ck.old-b", "older")  # names in the other order than times
    newer = folder(tmp_path / ".ck.old-a", "newer")
    os.utime(older, (1_000_000, 1_000_000))
    os.utime(newer, (2_000_000, 2_000_000))
    remove_leftovers(tmp_path / "ck")
    assert (tmp_path / "ck" / "file").read_text() == "newer" and [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_leftovers_of_other_targets_are_not_touched(tmp_path: Path) -> None:
    other = folder(tmp_path / ".ck2.tmp-x", "other writer")
    remove_leftovers(tmp_path / "ck")
    assert other.exists()


def test_a_file_at_the_target_is_refused_and_kept(tmp_path: Path) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(NotADirectoryError, match="notes.txt"):
        staging_folder(target)
    assert target.read_text() == "mine" and sorted(tmp_path.iterdir()) == [target]


def test_a_reader_puts_back_the_folder_set_aside_and_leaves_the_rest(tmp_path: Path) -> None:
    """``--resume`` reads where the two-rename window may have left nothing: it puts the old folder back (and
    only that: a staging folder is the next write's to clear); with the target there, nothing moves."""
    aside = folder(tmp_path / ".ck.resume.old-killed", "state")
    staged = folder(tmp_path / ".ck.resume.tmp-killed", "half")
    put_back(tmp_path / "ck.resume")
    assert (tmp_path / "ck.resume" / "file").read_text() == "state" and not aside.exists() and staged.exists()
    again = folder(tmp_path / ".ck.resume.old-later", "older")
    put_back(tmp_path / "ck.resume")
    assert (tmp_path / "ck.resume" / "file").read_text() == "state" and again.exists()


def test_write_file_replaces_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "run.steps.jsonl"
    target.write_text("step 1\nstep 2\n")
    write_file(target, b"step 1\n")
    assert target.read_text() == "step 1\n"

    def killed(self: Path, data: bytes) -> int:  # the write dies half way
        with open(self, "wb") as f:
            f.write(data[:3])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", killed)
    with pytest.raises(KeyboardInterrupt):
        write_file(target, b"step 1\nstep 2\nstep 3\n")
    monkeypatch.undo()
    assert target.read_text() == "step 1\n" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_published_folder_has_the_umasks_modes(tmp_path: Path) -> None:
    """Not mkdtemp's 0700, nor a writer's 0600 (save_pretrained's safetensors): another account may serve it."""
    old = os.umask(0o027)
    try:
        target = tmp_path / "ck"
        staged = staging_folder(target)
        (staged / "weights").write_bytes(b"w")
        os.chmod(staged / "weights", 0o600)
        (staged / "sub").mkdir(mode=0o700)
        publish(staged, target)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [target, *target.iterdir()]}
    assert modes == {"ck": 0o750, "weights": 0o640, "sub": 0o750}


def test_replacing_file_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "answers.jsonl"
    target.write_text("old\n")
    with pytest.raises(KeyboardInterrupt), replacing_file(target) as f:  # the writer dies half way
        f.write(b"new 1\n")
        raise KeyboardInterrupt
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == [target.name]
    with replacing_file(target) as f:
        f.write(b"new 1\n")
        f.write(b"new 2\n")
        assert target.read_text() == "old\n"  # not until the block ends
    assert target.read_text() == "new 1\nnew 2\n" and [p.name for p in tmp_path.iterdir()] == [target.name]
    with pytest.raises(ValueError), replacing_file(tmp_path / "new.jsonl") as f:
        raise ValueError("a bad line")
    assert not (tmp_path / "new.jsonl").exists()


def test_a_link_at_the_path_stays_a_link_and_its_file_is_replaced(tmp_path: Path) -> None:
    """Renaming onto a symbolic link replaced the link with a plain file and left the file it named as it was
    (a --json path linked to a results folder); a plain write goes through the link, and so do these now."""
    target = tmp_path / "results" / "latest.json"
    target.parent.mkdir()
    target.write_bytes(b"old")
    hop = tmp_path / "hop.json"
    hop.symlink_to(target)
    link = tmp_path / "out.json"
    link.symlink_to(hop)  # a link to a link: followed to the end
    write_file(link, b"new")
    assert link.is_symlink() and hop.is_symlink() and target.read_bytes() == b"new"
    with replacing_file(link) as f:
        f.write(b"newer")
    assert link.is_symlink() and target.read_bytes() == b"newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hop.json", "out.json", "results"]
    assert [p.name for p in target.parent.iterdir()] == ["latest.json"]  # no temporary file left beside it


@pytest.mark.parametrize("exists", [True, False])
def test_a_link_to_a_folder_stays_a_link_and_its_folder_is_replaced(tmp_path: Path, exists: bool) -> None:
    """The swap took the link itself: the link became the new folder, and the old one was then refused by rmtree
    as a link (a traceback, the staging link left beside it)."""
    (tmp_path / "disk").mkdir()
    real = folder(tmp_path / "disk" / "ck", "old") if exists else tmp_path / "disk" / "ck"
    link = tmp_path / "ck"
    link.symlink_to(real, target_is_directory=True)
    staged = staging_folder(link)
    assert staged.parent == real.parent
    (staged / "file").write_text("new")
    publish(staged, link)
    assert link.is_symlink() and (real / "file").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "disk"]
    assert [p.name for p in real.parent.iterdir()] == ["ck"]


def test_the_current_folder_is_refused_and_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = folder(tmp_path / "ck", "old")
    (target / "inside").mkdir()
    for cwd, given in ((target, Path(".")), (target / "inside", Path("..")), (target, target)):
        monkeypatch.chdir(cwd)
        with pytest.raises(OSError, match="the current folder") as e:
            staging_folder(given)
        assert e.value.filename == str(given)
    assert (target / "file").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_files_replaced_together_are_all_closed_before_any_is_renamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index and its splits: a write that fails only at its close (the last buffered bytes past a file-size
    limit or a quota) left the files renamed before it new and the rest old, a data set that no longer loads."""
    first, last = tmp_path / "train.csv", tmp_path / "index.json"
    for path in (first, last):
        path.write_bytes(b"old")
    opened = Path.open

    class FailsAtClose(io.BufferedWriter):
        def close(self) -> None:
            if not self.closed:
                super().close()
                raise OSError(errno.EFBIG, "File too large")

    def open_(path: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if mode == "wb" and path.name.startswith(".index.json.tmp-"):
            return FailsAtClose(io.FileIO(path, "wb"))
        return opened(path, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    with pytest.raises(OSError, match="File too large"), replacing_files([first, last]) as files:
        for f in files:
            f.write(b"new")
    assert first.read_bytes() == last.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "train.csv"]
    monkeypatch.undo()
    with replacing_files([first, last]) as files:
        for f, text in zip(files, (b"rows", b"index"), strict=True):
            f.write(text)
    assert (first.read_bytes(), last.read_bytes()) == (b"rows", b"index")
