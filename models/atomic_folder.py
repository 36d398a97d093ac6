"""Replace a folder so that its path always holds the old folder or the new one, never neither.

A checkpoint is a folder, and POSIX cannot rename a folder onto a non-empty
one. Two renames (target aside, then the new folder in) leave a moment with
nothing at the path, and a process killed there leaves no checkpoint where
every reader looks. On Linux ``renameat2(RENAME_EXCHANGE)`` swaps two paths in
one step: the target path goes from the old folder to the new one, and the old
one lands under the staging name, from where it is removed. Where the swap is
refused (another kernel, or a file system without it: ``EINVAL``), the two
renames are used, and the next write to the target closes their window: a
target missing beside a folder set aside is first put back (``put_back``,
which a reader such as ``--resume`` calls too).

A write killed at any point leaves at most a staging folder (``.NAME.tmp-*``)
or a folder set aside (``.NAME.old-*``) next to the target; the next write to
the same target removes them. One writer per target is assumed (under DDP only
rank 0 writes), since a second writer's staging folder would look like a
leftover.

A symbolic link at the target stays one: the folder it names is replaced (as
for files, below), and the staging folder is made beside that folder. The
current folder, or one that holds it, is refused: replaced, it would leave the
shell that runs the command in a deleted folder.

A single file is replaced with one rename (``write_file``, or ``replacing_file``
for one written piece by piece): written under a temporary name beside it, so
its path holds the old contents or the new ones.

This module touches only the file system (no torch), so a test can kill a
process in the middle of it cheaply.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from models.output_path import holds_current_folder

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


def staging_folder(target: Path) -> Path:
    """A fresh empty folder beside ``target`` to write the new contents into; leftovers are cleared first.
    A file at ``target`` is never replaced by a folder: that is a mistaken path, not an old version."""
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "a file, not a folder: not replaced", str(target))
    if holds_current_folder(target):  # the commands say so before their work (output_path.replaced_folder_problem)
        raise OSError(errno.EBUSY, "holds the current folder: not replaced", str(target))
    real = _real(target)
    real.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(real)
    return Path(tempfile.mkdtemp(prefix=f".{real.name}.tmp-", dir=real.parent))


def leftovers(target: Path) -> list[Path]:
    """Staging folders and folders set aside that killed writes to ``target`` left behind."""
    target = _real(target)
    if not target.parent.is_dir():
        return []
    prefixes = (f".{target.name}.tmp-", f".{target.name}.old-")
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefixes))


def put_back(target: Path) -> None:
    """Put back the newest folder set aside when ``target`` is missing: a write killed between its two renames.
    Readers call it too (``--resume``), so the old folder is found where every reader looks."""
    target = _real(target)
    aside = [p for p in leftovers(target) if p.name.startswith(f".{target.name}.old-")]
    if aside and not target.exists():
        try:
            os.replace(max(aside, key=lambda p: p.stat().st_mtime), target)
        except FileNotFoundError:  # another process (a DDP rank) put it back first
            pass


def remove_leftovers(target: Path) -> None:
    """Put back a folder set aside when the target is missing (the two-rename window), then remove the rest."""
    put_back(target)
    for path in leftovers(target):
        shutil.rmtree(path, ignore_errors=True)


def usual_modes(folder: Path) -> None:
    """Give ``folder`` and what it holds the modes this process's umask gives a new folder and file (0755 and
    0644 under the usual 022): ``mkdtemp`` makes the staging folder 0700 and some writers (the safetensors files
    of ``save_pretrained``) 0600, which a serving account other than the trainer could not read."""
    probe = folder / ".mode-probe"
    probe.touch()  # 0666 less the umask
    file_mode = probe.stat().st_mode & 0o777 | 0o600  # the owner keeps read and write, whatever the umask
    probe.unlink()
    folder_mode = file_mode | (file_mode & 0o444) >> 2  # search where read is allowed (0o700 at least)
    for path in folder.rglob("*"):
        os.chmod(path, folder_mode if path.is_dir() else file_mode)
    os.chmod(folder, folder_mode)


def publish(staged: Path, target: Path) -> None:
    """Move the complete folder ``staged`` to ``target`` (with ``usual_modes``), replacing what is there in one
    step where possible (through a symbolic link at ``target``, as ``staging_folder``)."""
    target = _real(target)
    usual_modes(staged)
    if not target.exists():
        os.replace(staged, target)  # a rename onto a free name is atomic
        return
    if _exchange(staged, target):
        shutil.rmtree(staged)  # it holds the old folder now
        return
    aside = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, aside)
    os.replace(staged, target)
    shutil.rmtree(aside)


def write_file(path: Path, data: bytes) -> None:
    """Replace the file ``path`` with ``data`` in one step: written under a temporary name beside it, then renamed
    onto it, so a process killed meanwhile leaves the old file whole. A symbolic link at ``path`` stays one: the
    file it names is replaced, as a plain write through the link would change it."""
    path = _through_links(path)
    tmp = _temporary(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def replacing_file(path: Path) -> Iterator[BinaryIO]:
    """``write_file`` for contents written piece by piece (too many to hold at once): a file under the temporary
    name, renamed onto ``path`` when the block ends; a block that raises, or a process killed meanwhile, leaves
    the old file whole (and no file where there was none). A symbolic link stays one, as in ``write_file``."""
    with replacing_files([path]) as (f,):
        yield f


@contextlib.contextmanager
def replacing_files(paths: Sequence[Path]) -> Iterator[list[BinaryIO]]:
    """``replacing_file`` for files that belong together (an index and the splits labelled with it): each is
    written in full and closed under its temporary name before any is renamed onto its path, in the order given,
    so a block that raises or a write that fails only at its close (the last buffered bytes: a file-size limit,
    a quota, a network file system) leaves every old file whole. A process killed between the renames leaves
    the first ones renamed: put first what a reader checks the others against."""
    paths = [_through_links(p) for p in paths]
    temporaries = [_temporary(p) for p in paths]
    with contextlib.ExitStack() as opened:
        try:
            files: list[BinaryIO] = [opened.enter_context(tmp.open("wb")) for tmp in temporaries]
            yield files
            opened.close()  # every file closed, its last bytes written, before the first rename
            for tmp, path in zip(temporaries, paths, strict=True):
                os.replace(tmp, path)
        finally:
            opened.close()
            for tmp in temporaries:
                tmp.unlink(missing_ok=True)


def _through_links(path: Path) -> Path:
    """The file a symbolic link at ``path`` names (through every link), else ``path`` itself: renaming onto the
    link would replace the link with a plain file, and leave the file it named as it was."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _real(folder: Path) -> Path:
    """``folder``'s path with every symbolic link on it followed, absolute: where its renames happen."""
    return Path(os.path.realpath(folder))


def _temporary(path: Path) -> Path:
    """The name a new version of the file ``path`` is written under, beside it."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where this kernel, libc or file system cannot."""
    if sys.platform != "linux":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        renameat2 = libc.renameat2  # glibc >= 2.28
    except AttributeError:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"not replaced by the new folder {a.name}: {os.strerror(err)}", str(b))
