"""``vstar sft``: supervised next-SID training (``training.sft.trainer`` does the work).

``training.cli.commands.register`` calls ``register_sft`` between ``vstar sids`` and
``vstar eval``, so ``vstar --help`` lists the stages in the order they run. The
handler builds and checks the configuration (``training.sft.config``, which imports
nothing heavy) before torch is imported or data is read.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Literal

import typer
from typer._click.core import ParameterSource  # typer vendors click from 0.28 on

from training.cli.options import (
    MAX_SEED,
    DataOpt,
    DeviceOpt,
    ForceOpt,
    FusionOpt,
    NameOpt,
    ResumeOpt,
    RootOpt,
    StepsOpt,
    SummaryOpt,
    TensorBoardOpt,
    check_run_outputs,
    checkpoint_out,
    load_data,
    local_model,
    run_training,
    setup_logging,
    steps_in_place_of_epochs,
)


def register_sft(app: typer.Typer) -> None:
    @app.command()
    def sft(
        ctx: typer.Context,
        out: Annotated[
            Path, typer.Option("--out", help="Checkpoint folder to write (best model).", callback=checkpoint_out)
        ],
        data: DataOpt = None,
        minionerec_root: RootOpt = None,
        dataset: NameOpt = None,
        preset: Annotated[
            Literal["tiny", "small"],
            typer.Option(
                "--preset",
                help="Model size, built from a config (nothing downloaded). small brings its training recipe: "
                "the defaults marked [recipe] below; any option given overrides it.",
            ),
        ] = "small",
        base_model: Annotated[
            Path | None,
            typer.Option(
                "--base-model",
                help="Local pretrained causal LM folder (e.g. Qwen2.5-0.5B), in place of --preset: no preset's recipe; "
                "--lr 3e-4 (MiniOneRec's SFT) unless given.",
                callback=local_model,
            ),
        ] = None,
        train_splits: Annotated[
            str | None,
            typer.Option("--train-splits", help="Comma list of splits to train on [recipe: train,valid; else train]."),
        ] = None,
        epochs: Annotated[
            int | None, typer.Option("--epochs", min=1, help="Passes over the training rows [recipe: 20; else 10].")
        ] = None,
        max_steps: StepsOpt = None,
        batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Rows per step [64].")] = None,
        lr: Annotated[
            float | None, typer.Option("--lr", min=0.0, help="Peak AdamW learning rate [2e-3; --base-model: 3e-4].")
        ] = None,
        holdout: Annotated[
            int | None,
            typer.Option(
                "--holdout",
                min=0,
                help="Most recent valid rows held out to select the epoch and the fusion weight when valid is "
                "trained on [recipe: 2000; else 500] (0: train on all of valid and keep the last model, a refit).",
            ),
        ] = None,
        eval_every: Annotated[
            int | None, typer.Option("--eval-every", min=0, help="Steps between validations (0: each epoch) [0].")
        ] = None,
        eval_limit: Annotated[
            int | None,
            typer.Option(
                "--eval-limit", min=1, help="Selection rows decoded at each validation [recipe: 2000; else 1000]."
            ),
        ] = None,
        seed: Annotated[
            int | None,
            typer.Option("--seed", min=0, max=MAX_SEED, help="Seed for weights, data order and sampling [0]."),
        ] = None,
        crop_prob: Annotated[
            float | None,
            typer.Option(
                "--crop-prob",
                min=0.0,
                max=1.0,
                help="Chance a history is cut to a random recent suffix each step [recipe: 0.3; else 0].",
            ),
        ] = None,
        last_item_prob: Annotated[
            float | None,
            typer.Option(
                "--last-item-prob",
                min=0.0,
                max=1.0,
                help="Chance a history is cut to its last item alone each step [recipe: 0.2; else 0].",
            ),
        ] = None,
        text_init: Annotated[
            bool | None,
            typer.Option(
                "--text-init/--no-text-init",
                help="Initialise SID token embeddings from item_emb.npy (PCA of token means) [recipe: on; else off].",
            ),
        ] = None,
        embed_dropout: Annotated[
            float | None,
            typer.Option(
                "--embed-dropout", min=0.0, max=0.99, help="Dropout on input embeddings [recipe: 0.25; else 0]."
            ),
        ] = None,
        hidden_dropout: Annotated[
            float | None,
            typer.Option(
                "--hidden-dropout",
                min=0.0,
                max=0.99,
                help="Residual dropout on each layer's attention and MLP output [recipe: 0.1; else 0].",
            ),
        ] = None,
        item_tokens: Annotated[
            bool | None,
            typer.Option("--item-tokens", help="Follow each history item in the prompt by a whole-SID token."),
        ] = None,
        max_history: Annotated[
            int | None,
            typer.Option(
                "--max-history",
                min=1,
                help="History items in each prompt, the most recent; the served model keeps it [10, MiniOneRec's].",
            ),
        ] = None,
        ema: Annotated[
            float | None,
            typer.Option(
                "--ema",
                min=0.0,
                help="Decay of a moving average of the weights, validated and saved instead [recipe: 0.999; else 0].",
            ),
        ] = None,
        precision: Annotated[
            Literal["auto", "fp32", "bf16"] | None,
            typer.Option(
                "--precision",
                help="auto: bf16 autocast on GPUs that run it natively (compute capability 8+), else fp32 [auto].",
            ),
        ] = None,
        fusion_weight: FusionOpt = None,
        refit: Annotated[
            bool | None,
            typer.Option(
                "--refit/--no-refit",
                help="After the held-out run (kept at <out>.heldout), train again on all of train + valid with its "
                "fusion weight and keep the last model at <out>; needs valid in --train-splits and --holdout above 0 "
                "[recipe: on, off without those; else off].",
            ),
        ] = None,
        device: DeviceOpt = "cpu",
        resume: ResumeOpt = False,
        force: ForceOpt = False,
        json_out: SummaryOpt = None,
        tensorboard: TensorBoardOpt = None,
    ) -> None:
        """Supervised next-SID training; keeps the best checkpoint by held-out HR@10, then chooses its fusion weight."""
        if base_model is not None and ctx.get_parameter_source("preset") is not ParameterSource.DEFAULT:
            raise typer.BadParameter("--preset builds a model from a config, which --base-model replaces: give one")
        steps_in_place_of_epochs(ctx, max_steps)
        check_run_outputs(out, json_out, tensorboard, (data, minionerec_root), resume, force)
        from training.data.dataset import parse_splits
        from training.sft.config import base_model_problem, recipe_config

        problem = base_model_problem(base_model) if base_model is not None else None
        if problem is not None:
            raise typer.BadParameter(problem)

        setup_logging()
        try:
            config = recipe_config(
                preset,
                str(base_model) if base_model else None,
                epochs=epochs,
                max_steps=max_steps,
                batch_size=batch_size,
                lr=lr,
                train_splits=tuple(parse_splits(train_splits)) if train_splits is not None else None,
                holdout=holdout,
                eval_every=eval_every,
                eval_limit=eval_limit,
                seed=seed,
                crop_prob=crop_prob,
                last_item_prob=last_item_prob,
                text_init=text_init,
                embed_dropout=embed_dropout,
                item_tokens=item_tokens,
                max_history=max_history,
                hidden_dropout=hidden_dropout,
                precision=precision,
                ema=ema,
                fusion_weight=fusion_weight,
                refit=refit,
            )
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        ds = load_data(data, minionerec_root, dataset)
        if config.text_init and text_init is None and ds.embeddings is None:  # the recipe's, not asked for
            # as the recipe's refit gives way to options that rule it out: a data set without embeddings still
            # trains by the rest of the recipe (the manifest's config says text_init false), and says what it lacks
            logging.getLogger("training.sft").warning(
                "the %s recipe's --text-init is off: %s has no item_emb.npy (make it with vstar embed --data DIR "
                "--encoder PATH, a local text encoder, for the recipe as measured; --no-text-init silences this)",
                preset,
                data,
            )
            config = replace(config, text_init=False)
        from training.run_files import default_curves
        from training.sft.trainer import train_sft

        curves = tensorboard or default_curves(out)
        run_training(lambda dev: train_sft(ds, out, config, dev, resume, tensorboard=curves), device, json_out)
