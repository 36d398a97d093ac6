"""``vstar baseline pop|transition|sasrec``: the README table's baselines, written in ``vstar eval``'s JSON shape;
``vstar compare``: paired differences between two methods' eval files (``training.evaluation.compare``).

``vstar.py`` calls ``register_baseline``; the handler parses
options, builds a ``SASRecConfig`` and calls ``training.baselines.run``. Bad input
(unknown baseline or split, a trained-on evaluation split, an invalid SASRec
setting, an option of another baseline, which the one named would ignore)
exits with a usage error naming the problem. Heavy imports stay inside the
handler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from training.cli.options import (
    MAX_SEED,
    DataOpt,
    NameOpt,
    RootOpt,
    comma_list,
    given_options,
    load_data,
    setup_logging,
    writable_file,
    write_json,
)

JsonOpt = Annotated[
    Path | None, typer.Option("--json", help="Write {metrics, rows, seconds, ...} here.", callback=writable_file)
]
PopCountsOpt = Annotated[
    Literal["targets", "all"], typer.Option("--pop-counts", help="pop: count targets, or all (targets and histories).")
]
PatienceOpt = Annotated[
    int, typer.Option("--patience", min=1, help="sasrec: epochs without a better selection score before stopping.")
]
HoldoutOpt = Annotated[
    int,
    typer.Option("--holdout", min=1, help="sasrec: latest valid rows held out for selection when valid is trained on."),
]
# SASRec's own: the shared --epochs and --seed help (training.cli.options) does not say that pop and transition,
# which train nothing, refuse them
SasrecEpochsOpt = Annotated[
    int,
    typer.Option(
        "--epochs", min=1, help="sasrec: passes over the training rows, at most (--patience, --max-steps: fewer)."
    ),
]
SasrecSeedOpt = Annotated[
    int, typer.Option("--seed", min=0, max=MAX_SEED, help="sasrec: seed for weights, data order and sampling.")
]
# each baseline's own options (parameter name -> flag): given on the command line to another baseline, which
# would ignore them, they are refused, so that no result looks configured by an option its baseline never read
OWN_OPTIONS = {
    "pop": {"pop_counts": "--pop-counts"},
    "transition": {"window": "--window"},
    "sasrec": {
        name: "--" + name.replace("_", "-")
        for name in (
            "loss", "loss_on", "hidden", "blocks", "heads", "dropout", "lr", "weight_decay", "batch_size", "epochs",
            "max_steps", "patience", "holdout", "seed", "threads",
        )
    },
}  # fmt: skip


def ignored_options(ctx: typer.Context, name: str) -> list[str]:
    """The options given on the command line that belong to a baseline other than ``name``, each as
    ``"--flag is sasrec's"``."""
    return [
        f"{flag} is {owner}'s"
        for owner, flags in OWN_OPTIONS.items()
        if owner != name
        for flag in given_options(ctx, flags)
    ]


def register_baseline(app: typer.Typer) -> None:
    @app.command()
    def baseline(
        ctx: typer.Context,
        name: Annotated[
            Literal["pop", "transition", "sasrec"],
            typer.Argument(
                help="pop (most popular items), transition (item-transition counts) or sasrec (Kang & McAuley 2018)."
            ),
        ],
        data: DataOpt = None,
        minionerec_root: RootOpt = None,
        dataset: NameOpt = None,
        json_out: JsonOpt = None,
        train_splits: Annotated[
            str,
            typer.Option(
                "--train-splits",
                help="Comma list of the splits the baseline learns from (pop's and transition's counts, SASRec's "
                "training and selection rows) and whose rows define the long tail of tail_share@10.",
            ),
        ] = "train",
        split: Annotated[
            Literal["test", "valid"], typer.Option("--split", help="The split to score (valid: if not trained on).")
        ] = "test",
        pop_counts: PopCountsOpt = "targets",
        window: Annotated[
            int, typer.Option("--window", min=1, help="transition: last history items whose successors are counted.")
        ] = 3,
        loss: Annotated[
            Literal["ce", "bce"], typer.Option("--loss", help="sasrec: ce (full softmax) or bce (sampled).")
        ] = "ce",
        loss_on: Annotated[
            Literal["last", "all"], typer.Option("--loss-on", help="sasrec: last position or all (paper).")
        ] = "last",
        hidden: Annotated[int, typer.Option("--hidden", min=1, help="sasrec: embedding width.")] = 64,
        blocks: Annotated[int, typer.Option("--blocks", min=1, help="sasrec: self-attention blocks.")] = 2,
        heads: Annotated[int, typer.Option("--heads", min=1, help="sasrec: attention heads.")] = 1,
        dropout: Annotated[float, typer.Option("--dropout", min=0.0, max=0.99, help="sasrec: dropout rate.")] = 0.2,
        lr: Annotated[float, typer.Option("--lr", min=0.0, help="sasrec: AdamW learning rate.")] = 1e-3,
        weight_decay: Annotated[
            float, typer.Option("--weight-decay", min=0.0, help="sasrec: AdamW weight decay.")
        ] = 0.0,
        batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="sasrec: rows per step.")] = 128,
        epochs: SasrecEpochsOpt = 200,
        max_steps: Annotated[
            int | None,
            typer.Option(
                "--max-steps", min=1, help="sasrec: stop after this many optimizer steps, or when --epochs end first."
            ),
        ] = None,
        patience: PatienceOpt = 5,
        holdout: HoldoutOpt = 500,
        seed: SasrecSeedOpt = 0,
        threads: Annotated[int, typer.Option("--threads", min=0, help="sasrec: torch threads (0: default).")] = 1,
    ) -> None:
        """Most-popular, item transitions or SASRec, scored on a split as `vstar eval` scores the generative model."""
        from training.data.dataset import Holdout, parse_splits, training_rows

        ignored = ignored_options(ctx, name)
        if ignored:  # a result must not look configured by an option its baseline never read
            what = "it" if len(ignored) == 1 else "them"
            raise typer.BadParameter(f"{'; '.join(ignored)}: {name} would ignore {what}; give only {name}'s options")
        splits = parse_splits(train_splits)
        from training.baselines.run import check_request, run_pop, run_sasrec, run_transition
        from training.baselines.sasrec import SASRecConfig, num_threads

        try:  # SASRec's settings, checked before the data set loads (seconds on a real one)
            config = SASRecConfig(
                hidden=hidden,
                blocks=blocks,
                heads=heads,
                dropout=dropout,
                loss=loss,
                loss_on=loss_on,
                epochs=epochs,
                max_steps=max_steps,
                patience=patience,
                batch_size=batch_size,
                lr=lr,
                weight_decay=weight_decay,
                seed=seed,
            )
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        setup_logging()
        ds = load_data(data, minionerec_root, dataset)
        try:
            check_request(ds, name, split, splits)
            if name == "sasrec":  # before training: a --holdout that takes all of valid, as sft refuses it
                training_rows(ds, Holdout(tuple(splits), holdout))
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        if name == "pop":
            write_json(json_out, run_pop(ds, split, splits, pop_counts))
        elif name == "transition":
            write_json(json_out, run_transition(ds, split, splits, window))
        else:
            with num_threads(threads or None):  # 1 by default: see training.baselines.sasrec
                write_json(json_out, run_sasrec(ds, split, splits, config, holdout))

    @app.command()
    def compare(
        ctx: typer.Context,
        base: Annotated[str, typer.Option("--base", help="Comma list of eval JSON files of the base method's seeds.")],
        other: Annotated[str, typer.Option("--other", help="Comma list of eval JSON files of the other method's.")],
        samples: Annotated[int, typer.Option("--samples", min=100, help="Bootstrap draws over rows.")] = 2000,
        seed: Annotated[
            int, typer.Option("--seed", min=0, max=MAX_SEED, help="Seed for the bootstrap's draws of rows.")
        ] = 0,
        json_out: Annotated[
            Path | None, typer.Option("--json", help="Write the comparison here.", callback=writable_file)
        ] = None,
        by: Annotated[
            Literal["history", "target"] | None,
            typer.Option(
                "--by",
                help="Also compare within segments of the rows, read back from --data: history (its length: 1, "
                "2-3, 4-6, 7-10, 11+) or target (its popularity in --train-splits' rows: head, tail, unseen).",
            ),
        ] = None,
        data: Annotated[
            Path | None, typer.Option("--data", help="With --by: the data folder the eval files scored.")
        ] = None,
        train_splits: Annotated[
            str,
            typer.Option(
                "--train-splits",
                help="With --by target: the splits whose rows rank items' popularity (as vstar eval's, for "
                "tail_share@10).",
            ),
        ] = "train",
    ) -> None:
        """Paired test differences (other - base) per metric, with 95% bootstrap intervals over rows."""
        from training.data.dataset import counted_splits
        from training.evaluation.compare import compare_runs
        from training.evaluation.segments import segmenter

        paths = {
            name: [Path(p) for p in comma_list(value, f"--{name}", str, "eval JSON files")]
            for name, value in (("base", base), ("other", other))
        }
        for name, files in paths.items():
            missing = [str(p) for p in files if not p.is_file()]
            if not files or missing:
                raise typer.BadParameter(f"--{name}: no such eval JSON {', '.join(missing) or '(empty list)'}")
            if json_out is not None and any(p.resolve() == json_out.resolve() for p in files):
                raise typer.BadParameter(f"--json {json_out} is one of --{name}'s eval JSON files; write it elsewhere")
        if (by is None) != (data is None):
            raise typer.BadParameter("--by and --data go together: the segments are read from the data folder")
        if by != "target" and given_options(ctx, {"train_splits": "--train-splits"}):
            raise typer.BadParameter(
                f"--train-splits is read by --by target alone, which {'--by ' + by if by else 'a plain compare'} "
                "would ignore: use it with --by target"
            )
        segments = None
        if by is not None and data is not None:
            try:
                splits = counted_splits(train_splits)
            except ValueError as e:
                raise typer.BadParameter(str(e)) from None
            segments = segmenter(load_data(data, None, None), by, splits)
        try:
            write_json(json_out, compare_runs(paths["base"], paths["other"], samples, seed, segments))
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
