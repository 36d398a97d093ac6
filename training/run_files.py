"""The files a training run keeps beside its ``--out`` checkpoint: their names, finding them, clearing them.

A run at ``out`` (``vstar sft``, ``vstar rl``) writes, besides the kept model at ``out``:

* ``<out>.resume``: the latest state, for ``--resume`` (``training.loop``);
* ``<out>.heldout`` and ``<out>.heldout.resume``: SFT ``--refit``'s held-out run;
* ``<out>.steps.jsonl``: RL's per-step figures (``training.rl.run``);
* ``<out>.tb`` and ``<out>.tb-heldout``: TensorBoard curves when ``--tensorboard`` is not given.

Design decisions:

* A fresh run (no ``--resume``) starts with none of these side files
  (``clear_side_files``): an earlier run's resume state, held-out run, step log
  or curves would otherwise mix with the new run's, or be taken for it. The
  kept model at ``out`` is not cleared: it is replaced atomically when the new
  run saves its first, so a run that fails early leaves it in place.
* The CLI refuses a fresh run onto an earlier run's files unless ``--force``
  (``earlier_run``); the trainers clear them only once their own checks have
  passed, so a mistaken option loses nothing.
* A ``--tensorboard`` folder given by the user is never cleared: it may hold
  other runs' curves (``tensorboard --logdir runs/``).
* Nothing here imports torch: the CLI checks paths before torch loads.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from models.atomic_folder import leftovers


def beside(out: Path, suffix: str) -> Path:
    """``out`` with ``suffix`` appended to its name, in the same folder."""
    return out.parent / f"{out.name}{suffix}"


def resume_folder(out: Path) -> Path:
    """Where a run writing ``out`` keeps its latest state."""
    return beside(out, ".resume")


def heldout_folder(out: Path) -> Path:
    """Where SFT ``--refit`` keeps the held-out run that chose the refit's fusion weight."""
    return beside(out, ".heldout")


def steps_file(out: Path) -> Path:
    """RL's per-step figures, one JSON line per step."""
    return beside(out, ".steps.jsonl")


def default_curves(out: Path) -> Path:
    """The TensorBoard folder of a run at ``out`` without ``--tensorboard``."""
    return beside(out, ".tb")


def heldout_curves(curves: Path) -> Path:
    """The TensorBoard folder of a refit's held-out run, beside the refit's ``curves``."""
    return curves.with_name(f"{curves.name}-heldout")


def replaced_folders(out: Path) -> list[Path]:
    """The folders a run at ``out`` replaces whole at each save (checkpoints): nothing else may live in them."""
    return [out, resume_folder(out), heldout_folder(out), resume_folder(heldout_folder(out))]


def side_files(out: Path) -> list[Path]:
    """Everything a run at ``out`` writes beside the kept model."""
    curves = default_curves(out)
    return [*replaced_folders(out)[1:], steps_file(out), curves, heldout_curves(curves)]


def earlier_run(out: Path) -> Path | None:
    """The first file of an earlier run at ``out`` (its checkpoint, else a side file); None when there is none."""
    if (out / "manifest.json").is_file():
        return out
    return next((p for p in side_files(out) if p.exists()), None)


def clear_side_files(out: Path) -> None:
    """Remove an earlier run's side files (and what killed writes left of them) before a fresh run at ``out``."""
    for path in side_files(out):
        for leftover in leftovers(path):
            shutil.rmtree(leftover, ignore_errors=True)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
