"""Whether a path can take a command's output file, checked before the work whose result it is to hold.

Shared by the training commands (``--json``, a figure's ``--out``,
``--tensorboard``), the service's benchmark (``vstar bench serve --json``) and
the load test (``vstar loadtest --out``), which do not import each other: each
turns the sentence returned here into its own one-line error.
Nothing here imports torch.
"""

from __future__ import annotations

import os
from pathlib import Path


def parents_problem(path: Path) -> str | None:
    """What stops this process creating ``path`` (a sentence), or None: the nearest existing folder above it
    must be a folder it may write in."""
    above = next((p for p in path.parents if p.exists()), Path("."))
    if not above.is_dir():
        return f"{above} is a file, so {path} cannot be written under it"
    if hasattr(os, "statvfs") and os.statvfs(above).f_flag & os.ST_RDONLY:  # e.g. a volume mounted read-only
        return f"cannot write under {above} (a read-only file system)"  # (access() would say EROFS, as denied)
    if not os.access(above, os.W_OK | os.X_OK):
        return f"cannot write under {above} (permission denied)"
    return None


def stored_folder(folder: Path) -> str | None:
    """What ``folder`` holds that no output file may be written into (a phrase), or None: a checkpoint or a data
    set, whose files other commands read (a report there could replace one of them, or sit among them)."""
    if (folder / "manifest.json").is_file():
        return "a checkpoint (it holds manifest.json)"
    if (folder / "index.json").is_file() or next(folder.glob("*.index.json"), None) is not None:
        return "a data set (it holds a SID index)"
    return None


def output_file_problem(path: Path) -> str | None:
    """What stops this process writing the file ``path`` (a sentence), or None. A symbolic link is checked where
    it leads, since the writes follow it (``models.atomic_folder.write_file``); anything but a regular file at
    the path is refused, since those writes rename a new file over it (a device such as /dev/full, a pipe)."""
    if path.is_dir():
        return f"{path} is a folder: give the path of a file to write"
    if path.exists() and not path.is_file():
        return f"{path} is not a regular file (a device, a pipe or a socket), which the write would replace"
    real = Path(os.path.realpath(path))
    held = stored_folder(real.parent)
    if held is not None:
        where = f" (a link to {real})" if path.is_symlink() else ""
        return f"{path}{where} is inside {real.parent}, {held}: write it elsewhere, so that no file of it is replaced"
    problem = parents_problem(path)
    if problem is None and path.exists() and not os.access(path, os.W_OK):
        return f"{path} cannot be written (permission denied)"
    return problem


def holds_current_folder(path: Path) -> bool:
    """Whether ``path``, links followed, is the current folder or a folder above it."""
    return Path.cwd().resolve().is_relative_to(Path(path).resolve())


def replaced_folder_problem(path: Path) -> str | None:
    """What stops this process replacing the folder ``path`` whole by one written beside it
    (``models.atomic_folder``; a sentence), or None: it may not hold the current folder (the shell that ran the
    command would be left in a deleted folder) nor be a mount point (a volume: the swap onto it fails), and the
    folder above it must take the new one (``parents_problem``), and not be a checkpoint or a data set, whose
    own writes replace them whole (``vstar fuse``, a resumed run) and would take the new folder with them. Only
    the nearest existing folder above is asked: files of those names further up may be anything's."""
    above = next((p for p in Path(path).absolute().parents if p.exists()), None)
    held = stored_folder(above) if above is not None and above.is_dir() else None
    if held is not None:
        return f"{path} lies inside {above}, {held}: give a folder outside it"
    if holds_current_folder(path):
        return f"{path} holds the current folder, which the new folder would replace: give a folder inside it"
    if os.path.ismount(Path(path).resolve()):
        return f"{path} is a mount point, which the new folder cannot replace: give a folder inside it"
    return parents_problem(path)


def output_folder_problem(path: Path) -> str | None:
    """What stops this process writing files into the folder ``path``, new or existing (a sentence), or None."""
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder"
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        return f"cannot write in {path} (permission denied)"
    return parents_problem(path)
