"""The options and helpers every training-side command module shares (``training.cli.*``).

Option types (``Annotated`` typer options) and the callbacks that check output
paths and devices as the options are read (so a path that would destroy
something, or could not take the output, fails before any work), data loading
with one-line errors, the cheap checkpoint check before torch loads, JSON
output, logging, and the distributed session a training command runs in.
Nothing here imports torch, except the device check for a device other than the CPU.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from typer._click.core import ParameterSource  # typer vendors click from 0.28 on

from models.atomic_folder import put_back, write_file
from models.output_path import output_file_problem, output_folder_problem, replaced_folder_problem
from training.run_files import earlier_run, replaced_folders, side_files, steps_file

T = TypeVar("T")


def writable_file(path: Path | None) -> Path | None:
    """Typer callback of every output file option (``--json``, a PNG's ``--out``): checked when the command
    starts, so a path that cannot take a file fails at once, not after the work it was to record."""
    problem = None if path is None else output_file_problem(path)
    if problem is not None:
        raise typer.BadParameter(problem)
    return path


def device_name(value: str) -> str:
    """Typer callback of ``--device``: a torch device this machine has. torch is imported only for a device
    other than the CPU (the command imports it anyway), so a mistake on the CPU is still told before it loads."""
    if value == "cpu":
        return value
    from models.device import device_problem

    problem = device_problem(value)
    if problem is not None:
        raise typer.BadParameter(problem)
    return value


def local_model(path: Path | None) -> Path | None:
    """Typer callback of a pretrained model's folder (``--base-model``, ``--encoder``): nothing is downloaded,
    so it must be a local folder in ``save_pretrained``'s layout."""
    if path is not None and not (path / "config.json").is_file():
        raise typer.BadParameter(
            f"{path} is not a local model folder (no config.json); nothing is downloaded: give the folder "
            "of a pretrained model (save_pretrained's layout)"
        )
    return path


def png_file(path: Path) -> Path:
    """Typer callback of a PNG's ``--out``: a writable file path ending in .png."""
    if path.suffix.lower() != ".png":
        raise typer.BadParameter(f"{path}: the figure is a PNG; give a path ending in .png")
    writable_file(path)
    return path


def folder_out(path: Path | None) -> Path | None:
    """Typer callback of an output folder option (``--tensorboard``): a folder or a new path, not a file."""
    problem = None if path is None else output_folder_problem(path)
    if problem is not None:
        raise typer.BadParameter(problem)
    return path


def checkpoint_out(path: Path) -> Path:
    """Typer callback of a training command's ``--out``: a new folder, or a checkpoint that the run replaces
    when it ends; never a file, nor a folder of other things (a data set, a project) that it would wipe."""
    if path.exists() and not path.is_dir():
        raise typer.BadParameter(f"{path} is a file, not a checkpoint folder")
    if path.is_dir() and not (path / "manifest.json").is_file() and any(path.iterdir()):
        raise typer.BadParameter(
            f"{path} is a folder that is not a checkpoint (no manifest.json), and the run would replace "
            "everything in it: give a new folder"
        )
    problem = replaced_folder_problem(path)
    if problem is not None:
        raise typer.BadParameter(problem)
    return path


def check_run_outputs(
    out: Path, json_out: Path | None, tensorboard: Path | None, data: Sequence[Path | None], resume: bool, force: bool
) -> None:
    """The checks of a training command's outputs against each other, before any work: ``--out`` outside the data
    set (``data``: ``--data``, ``--minionerec-root``), ``--json`` and ``--tensorboard`` outside the folders the run
    replaces whole (``<out>``, ``<out>.resume``, ...) and outside the data set; with ``--resume``, an earlier run
    at ``--out`` to continue; without ``--resume`` or ``--force``, none (``training.run_files``), which the new
    one would replace."""
    if resume and force:
        raise typer.BadParameter("--resume continues the run at --out, --force replaces it: give one of them")
    for folder in (d for d in data if d is not None):  # the run's checkpoints and side files would mix with the data
        if within(out, folder):
            where = "is the data folder" if within(folder, out) else f"lies inside the data folder {folder}"
            raise typer.BadParameter(f"{out} {where}: give a path outside it", param_hint="--out")
    for option, path, taken in (
        ("--json", json_out, [out, *side_files(out)]),
        ("--tensorboard", tensorboard, [*replaced_folders(out), steps_file(out)]),
    ):
        problem = None if path is None else overlap_problem(path, taken, out, data)
        if problem is not None:
            raise typer.BadParameter(problem, param_hint=option)
    if json_out is not None and tensorboard is not None and within(tensorboard, json_out):
        # the curves' folder would be made at the summary's path: the run would train to its end and lose the summary
        where = "is" if within(json_out, tensorboard) else "lies inside"
        raise typer.BadParameter(
            f"{tensorboard} {where} the --json file {json_out}: give the curves a folder of their own",
            param_hint="--tensorboard",
        )
    if resume:  # a save killed between its two renames set the folder aside: where --resume looks again
        for folder in replaced_folders(out):
            put_back(folder)
    # a state to continue: <out>.resume, or a refit's held-out run (the refit may not have saved one yet)
    resumable = any(folder.exists() for folder in replaced_folders(out)[1:])
    if resume and not resumable:  # before the data loads and its warnings print
        found = earlier_run(out)
        why = (
            "" if found is None else f" ({found} is left by a run that saved no state to resume: --force starts again)"
        )
        raise typer.BadParameter(f"no interrupted run at {out}: nothing to continue{why}", param_hint="--resume")
    found = None if resume or force else earlier_run(out)
    if found is not None:
        what = f"{out} holds an earlier run's checkpoint" if found == out else f"{found} exists, from an earlier run"
        how = (
            "--resume continues it, --force replaces it"
            if resumable
            else "it saved no state to resume: --force replaces it"
        )
        raise typer.BadParameter(f"{what}: {how}", param_hint="--out")


def overlap_problem(path: Path, taken: Sequence[Path], out: Path, data: Sequence[Path | None]) -> str | None:
    """What is wrong with writing ``path`` beside a run at ``out`` (a sentence), or None: it may be none of the
    run's own paths (``taken``) nor lie inside one, nor lie in a data folder."""
    for folder in taken:
        if within(path, folder):
            where = "is" if within(folder, path) else "lies inside"
            what = "the --out checkpoint folder" if folder == out else folder
            return f"{path} {where} {what}, which the run at --out {out} replaces: give a path outside it"
    for folder in (d for d in data if d is not None):
        if within(path, folder):
            where = "is the data folder" if within(folder, path) else f"lies inside the data folder {folder}"
            return f"{path} {where}: give a path outside it"
    return None


def within(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or lies inside it (links resolved)."""
    return path.resolve().is_relative_to(folder.resolve())


DataOpt = Annotated[
    Path | None,
    typer.Option("--data", help="Data set folder (train/valid/test CSV, index.json, item.json, item_emb.npy)."),
]
RootOpt = Annotated[
    Path | None,
    typer.Option("--minionerec-root", help="A MiniOneRec checkout, read in its own layout (with --dataset)."),
]
NameOpt = Annotated[
    str | None,
    typer.Option("--dataset", help="Data set name inside --minionerec-root, e.g. Industrial_and_Scientific."),
]
SplitsOpt = Annotated[
    str, typer.Option("--train-splits", help="Comma list of splits to train on: train, valid or train,valid.")
]
EpochsOpt = Annotated[int, typer.Option("--epochs", min=1, help="Passes over the training rows.")]
StepsOpt = Annotated[
    int | None,
    typer.Option(
        "--max-steps",
        min=1,
        help="Total optimizer steps, in place of --epochs (not with it): the run takes exactly this many (more or "
        "fewer passes over the rows than --epochs would make), and the learning-rate schedule spans them.",
    ),
]


def given_options(ctx: typer.Context, flags: Mapping[str, str]) -> list[str]:
    """The flags of ``flags`` (parameter name -> flag) given on the command line, not left at their defaults: an
    option that a run would ignore is refused only when given (a run must not look configured by it)."""
    return [flag for name, flag in flags.items() if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT]


def steps_in_place_of_epochs(ctx: typer.Context, max_steps: int | None) -> None:
    """``vstar sft`` and ``vstar rl``: ``--max-steps`` sets the run's length in place of ``--epochs``, so both given
    is refused: the run would ignore ``--epochs`` (``vstar baseline``'s ``--max-steps`` is a cap, a user who knows
    that one would expect the run to stop at whichever ends first)."""
    if max_steps is not None and given_options(ctx, {"epochs": "--epochs"}):
        raise typer.BadParameter(
            f"--max-steps {max_steps} sets the run's length in place of --epochs, which it would ignore: give one "
            "of them"
        )


MAX_SEED = 2**32 - 1  # the seeds numpy accepts; every --seed is checked against it
SeedOpt = Annotated[int, typer.Option("--seed", min=0, max=MAX_SEED, help="Seed for weights, data order and sampling.")]
TailSplitsOpt = Annotated[
    str,
    typer.Option(
        "--train-splits",
        help="Comma list of the splits the model trained on: their rows define the long tail of tail_share@10 "
        "(nothing is trained here).",
    ),
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the interrupted run that wrote <out>.resume.")]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Replace an earlier run at --out: its <out>.resume, <out>.heldout, <out>.steps.jsonl and <out>.tb are "
        "cleared at the start; its checkpoint stays until the new one is written.",
    ),
]
SummaryOpt = Annotated[
    Path | None, typer.Option("--json", help="Write the training summary here.", callback=writable_file)
]
TensorBoardOpt = Annotated[
    Path | None,
    typer.Option(
        "--tensorboard",
        help="Folder for TensorBoard scalars (loss, lr, held-out HR/NDCG) [<out>.tb].",
        callback=folder_out,
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="torch device: cpu, cuda, cuda:1 ...", callback=device_name)]
Decoder = Literal["beam", "ved"]
Split = Literal["test", "valid", "train"]
FusionOpt = Annotated[
    float | None,
    typer.Option(
        "--fusion-weight",
        min=0.0,
        help="Weight of the transition counts fused into beam search (0: off; default: chosen on held-out rows).",
    ),
]
HoldoutOpt = Annotated[
    int | None,
    typer.Option(
        "--holdout",
        min=1,
        help="Only the last N rows: with --split valid, the rows `--holdout N` kept out of training.",
    ),
]


def select_rows(rows: Sequence[Any], limit: int | None, holdout: int | None, split: str) -> Sequence[Any]:
    """The rows a scoring command reads: the last ``holdout`` (the held-out rows of a run trained on the
    split), then the first ``limit`` of those. A ``holdout`` beyond the split is an error: it would score the
    whole split as if it were the held-out rows."""
    if holdout is not None and holdout > len(rows):
        raise typer.BadParameter(
            f"--holdout {holdout} is more than the {len(rows)} rows of the {split} split; give at most {len(rows)}"
        )
    rows = rows[-holdout:] if holdout else rows
    return rows[:limit] if limit else rows


def load_data(data: Path | None, root: Path | None, dataset: str | None) -> Any:
    from training.data.dataset import DataError, load_dataset, load_minionerec

    if data is not None and root is not None:
        raise typer.BadParameter("give either --data or --minionerec-root, not both")
    if root is not None:
        if not dataset:
            raise typer.BadParameter("--minionerec-root needs --dataset NAME")
        try:
            return load_minionerec(root, dataset)
        except DataError as e:
            raise typer.BadParameter(str(e), param_hint="--minionerec-root") from None
    if data is None:
        raise typer.BadParameter("--data DIR (or --minionerec-root DIR --dataset NAME) is required")
    try:
        return load_dataset(data)
    except DataError as e:  # a missing or malformed file: one line naming it, no traceback
        raise typer.BadParameter(str(e), param_hint="--data") from None


def require_candidates(num_candidates: int, data: Any) -> None:
    """``--num-candidates`` G below the catalog's size: a group of G distinct SIDs is otherwise the whole
    catalog, every target reached and nothing learnt (G is at least 2, so the catalog needs 3 SIDs)."""
    sids = len(data.catalog.sids)
    if num_candidates >= sids:
        fix = f"give at most {sids - 1}" if sids > 2 else "RL needs a catalog of at least 3 SIDs"
        raise typer.BadParameter(
            f"--num-candidates {num_candidates} is not fewer than the {sids} SIDs of {data.name}'s catalog: a "
            f"group would be the whole catalog, its target always reached; {fix}"
        )


PER_ROW = ("target_ranks",)  # written to the file, too long for the terminal


def require_checkpoint(path: Path, option: str = "--checkpoint") -> Path:
    """A cheap look before torch loads: the folder exists and has the manifest every checkpoint has."""
    if not (path / "manifest.json").is_file():
        what = "does not exist" if not path.exists() else "is not a checkpoint folder (no manifest.json)"
        raise typer.BadParameter(f"{path} {what}", param_hint=option)
    return path


def read_manifest(folder: Path, option: str = "--checkpoint") -> dict[str, Any]:
    """A checkpoint's manifest (after ``require_checkpoint``), without torch."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise typer.BadParameter(f"{folder}: manifest.json is not valid JSON: {e}", param_hint=option) from None
    if not isinstance(manifest, dict):
        raise typer.BadParameter(f"{folder}: manifest.json holds no object", param_hint=option)
    return manifest


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    """``payload`` into ``path`` (when given), then on stdout without the per-row lists. The file is replaced in
    one step (``write_file``): a write cut short (Ctrl-C, a full disk) leaves an earlier result there whole."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, (json.dumps(payload, indent=2) + "\n").encode())
    typer.echo(json.dumps({k: v for k, v in payload.items() if k not in PER_ROW}, indent=2))


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_training(train: Callable[[str], dict[str, Any]], device: str, json_out: Path | None) -> None:
    """``train(device)``, inside a process group when torchrun / accelerate launched us; rank 0 writes the summary."""
    from training.distributed import distributed_session, is_main

    with distributed_session(device) as rank_device:
        summary = train(rank_device)
        if is_main():
            write_json(json_out, summary)


def int_list(text: str, option: str) -> tuple[int, ...]:
    return comma_list(text, option, positive_int, "positive integers")


def positive_int(text: str) -> int:
    number = int(text)
    if number < 1:
        raise ValueError(f"{number} is not a positive integer")
    return number


def float_list(text: str, option: str) -> tuple[float, ...]:
    return comma_list(text, option, finite_float, "finite numbers")


def finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text!r} is not a finite number")
    return number


def comma_list(text: str, option: str, kind: Callable[[str], T], what: str) -> tuple[T, ...]:
    """``text`` split at commas, each part converted by ``kind``; a part it refuses or an empty list is a
    one-line error naming ``option``."""
    if not text.strip():
        raise typer.BadParameter("empty list", param_hint=option)
    parts = text.split(",")
    empty = next((i for i, v in enumerate(parts, 1) if not v.strip()), None)
    if empty is not None:  # "1,,2" is a slip, not the list (1, 2): --level-weights would lose a level
        raise typer.BadParameter(f"entry {empty} of {text!r} is empty", param_hint=option)
    try:
        return tuple(kind(v) for v in parts)
    except ValueError:
        raise typer.BadParameter(f"expected a comma list of {what}, got {text!r}", param_hint=option) from None


def demo_policy(device: str) -> Any:
    """A random tiny-preset policy over a random 3-level catalog (256 codes per level, 3,000 items)."""
    import random

    from models.policy import Policy
    from models.sid_catalog import Item, SidCatalog, level_token

    rng = random.Random(0)
    items = {i: Item(i, "", tuple(level_token(lv, rng.randrange(256)) for lv in range(3))) for i in range(3000)}
    return Policy.from_preset("tiny", SidCatalog(items), seed=0).to(device)
