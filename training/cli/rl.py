"""The RL stage's subcommands: ``vstar rl``, ``vstar diagnose`` and ``vstar bench train``.

``vstar.py`` calls ``register_rl``; handlers only parse options,
build configs and call ``training.rl.trainer`` / ``training.rl.diagnose`` /
``training.bench.rl_bench``. Heavy imports stay inside the handlers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from training.cli.options import (
    MAX_SEED,
    DataOpt,
    Decoder,
    DeviceOpt,
    EpochsOpt,
    ForceOpt,
    HoldoutOpt,
    NameOpt,
    ResumeOpt,
    RootOpt,
    SeedOpt,
    Split,
    SplitsOpt,
    StepsOpt,
    SummaryOpt,
    TensorBoardOpt,
    check_run_outputs,
    checkpoint_out,
    float_list,
    given_options,
    load_data,
    require_candidates,
    require_checkpoint,
    run_training,
    select_rows,
    setup_logging,
    steps_in_place_of_epochs,
    writable_file,
    write_json,
)
from training.run_files import default_curves, replaced_folders

BudgetOpt = Annotated[int | None, typer.Option("--budget", min=1, help="VED token budget per prompt (default: VED's).")]
# vstar rl's options that only V-STAR reads, by parameter; and those that only one part of it reads, by the switch
# that turns the part off. Given explicitly where they would be ignored, they are refused (left at their defaults,
# they are not): a run must not look configured by an option it never read.
VSTAR_OPTIONS = {
    "no_sibling": "--no-sibling", "no_ved": "--no-ved", "no_dense": "--no-dense", "value_lr": "--value-lr",
    "value_coef": "--value-coef", "w_sib": "--w-sib", "sibling_norm": "--sibling-norm",
    "level_weights": "--level-weights", "budget": "--budget", "explore_slots": "--explore-slots",
    "value_warmup": "--value-warmup",
}  # fmt: skip
PART_OPTIONS = {
    "no_sibling": ("Sibling-GRPO", ("w_sib", "sibling_norm")),
    "no_ved": ("VED", ("budget", "explore_slots")),
    "no_dense": ("the dense reward", ("level_weights",)),
}


def ignored_options(ctx: typer.Context, algo: str) -> str | None:
    """The problem with options given on the command line that this run would ignore, or None."""
    if algo == "grpo":
        named = given_options(ctx, VSTAR_OPTIONS)
        if named:
            what = "is a V-STAR option" if len(named) == 1 else "are V-STAR options"
            return f"{', '.join(named)} {what}, which --algo grpo would ignore: use with --algo vstar"
        return None
    for switch, (part, options) in PART_OPTIONS.items():
        named = given_options(ctx, {name: VSTAR_OPTIONS[name] for name in options})
        if ctx.params[switch] and named:
            what = "is" if len(named) == 1 else "are"
            return f"{', '.join(named)} {what} read by {part} alone, which {VSTAR_OPTIONS[switch]} switches off"
    return None


def register_rl(app: typer.Typer, bench: typer.Typer) -> None:
    @app.command()
    def rl(
        ctx: typer.Context,
        init: Annotated[
            Path,
            typer.Option(
                "--init",
                help="SFT checkpoint to start from (or an RL one, to go on from it: the warning about rows SFT "
                "trained on then reads the SFT model it descends from); also the frozen KL reference.",
            ),
        ],
        out: Annotated[
            Path,
            typer.Option(
                "--out", help="Checkpoint folder to write (best model by validation).", callback=checkpoint_out
            ),
        ],
        data: DataOpt = None,
        minionerec_root: RootOpt = None,
        dataset: NameOpt = None,
        algo: Annotated[
            Literal["grpo", "vstar"], typer.Option("--algo", help="grpo: MiniOneRec's baseline; vstar: V-STAR.")
        ] = "grpo",
        no_sibling: Annotated[bool, typer.Option("--no-sibling", help="V-STAR without Sibling-GRPO (D).")] = False,
        no_ved: Annotated[bool, typer.Option("--no-ved", help="V-STAR with beam search instead of VED (C).")] = False,
        no_dense: Annotated[
            bool, typer.Option("--no-dense", help="V-STAR value head on the sparse terminal reward (A).")
        ] = False,
        train_splits: SplitsOpt = "train",
        epochs: EpochsOpt = 1,
        max_steps: StepsOpt = None,
        batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompts per step.")] = 16,
        num_candidates: Annotated[int, typer.Option("--num-candidates", min=2, help="G, candidates per prompt.")] = 16,
        lr: Annotated[float, typer.Option("--lr", min=0.0, help="Policy learning rate.")] = 1e-4,
        value_lr: Annotated[
            float, typer.Option("--value-lr", min=0.0, help="V-STAR: learning rate of the value head.")
        ] = 1e-3,
        value_coef: Annotated[
            float,
            typer.Option(
                "--value-coef",
                min=0.0,
                help="V-STAR: weight of the value head's TD loss in the policy's loss, so that it also trains the "
                "backbone (0: the head reads detached states).",
            ),
        ] = 0.0,
        beta: Annotated[
            float, typer.Option("--beta", min=0.0, help="KL weight (chosen on held-out valid rows; MiniOneRec: 1e-3).")
        ] = 0.03,
        w_sib: Annotated[
            float, typer.Option("--w-sib", min=0.0, help="V-STAR: weight of the Sibling-GRPO term.")
        ] = 1.0,
        sibling_norm: Annotated[
            Literal["siblings", "group"],
            typer.Option(
                "--sibling-norm",
                help="V-STAR's Sibling-GRPO: divide a sibling set's centred child rewards by the set's own std "
                "(siblings) or by the whole group's reward std (group).",
            ),
        ] = "group",
        level_weights: Annotated[
            str | None,
            typer.Option(
                "--level-weights",
                help="V-STAR: the dense reward's weight per SID level, comma-separated (default: the paper's "
                "0.3,0.5,1.0 for three tokens; for D tokens 1/D, ..., 1/2, 1).",
            ),
        ] = None,
        ppo_epochs: Annotated[int, typer.Option("--ppo-epochs", min=1, help="Policy updates per rollout.")] = 1,
        budget: Annotated[
            int | None,
            typer.Option("--budget", min=1, help="V-STAR: VED's token budget per prompt in rollouts (default: VED's)."),
        ] = None,
        explore_slots: Annotated[
            int | None,
            typer.Option(
                "--explore-slots",
                min=0,
                help="V-STAR: slots of each group that VED gives to first-level codes the rest missed (default: 2).",
            ),
        ] = None,
        value_warmup: Annotated[
            int | None,
            typer.Option(
                "--value-warmup",
                min=0,
                help="V-STAR: TD-only steps of the value head on beam candidates before RL, policy frozen "
                "(default: 200; 0: none).",
            ),
        ] = None,
        eval_every: Annotated[int, typer.Option("--eval-every", min=1, help="Steps between validations.")] = 100,
        eval_limit: Annotated[int, typer.Option("--eval-limit", min=1, help="Validation rows decoded.")] = 1000,
        holdout: Annotated[
            int,
            typer.Option(
                "--holdout", min=0, help="Valid rows held out when valid is trained on (0: none, the last model kept)."
            ),
        ] = 500,
        fusion_weight: Annotated[
            float | None,
            typer.Option(
                "--fusion-weight",
                min=0.0,
                help="Weight of the transition counts fused into beam search at eval (default: the --init's).",
            ),
        ] = None,
        fused_rollouts: Annotated[
            bool,
            typer.Option(
                "--fused-rollouts",
                help="Rollouts (beam search or VED) fused with the transition counts at that weight, as served "
                "(each row's own transition left out of the counts).",
            ),
        ] = False,
        seed: SeedOpt = 0,
        device: DeviceOpt = "cpu",
        precision: Annotated[
            Literal["auto", "fp32", "bf16"],
            typer.Option(
                "--precision",
                help="auto: bf16 autocast on GPUs that run it natively (compute capability 8+), else fp32; the "
                "log-probs of the ratio and the KL are float32 either way.",
            ),
        ] = "auto",
        resume: ResumeOpt = False,
        force: ForceOpt = False,
        json_out: SummaryOpt = None,
        tensorboard: TensorBoardOpt = None,
    ) -> None:
        """RL from an SFT checkpoint: MiniOneRec's GRPO or V-STAR (value-guided search + Sibling-GRPO)."""
        weights = float_list(level_weights, "--level-weights") if level_weights is not None else None
        problem = ignored_options(ctx, algo)
        if problem is not None:
            raise typer.BadParameter(problem)
        steps_in_place_of_epochs(ctx, max_steps)
        require_checkpoint(init, "--init")
        taken = next((f for f in replaced_folders(out) if f.resolve() == init.resolve()), None)
        if taken is not None:  # the run would write over the checkpoint it starts from
            what = (
                f"{out} is the --init checkpoint, which the run starts from and keeps as its KL reference"
                if taken == out
                else f"the --init checkpoint {init} is one of the folders the run at --out {out} writes over (its "
                "resume state, a held-out run)"
            )
            raise typer.BadParameter(f"{what}: write the RL model to another folder", param_hint="--out")
        check_run_outputs(out, json_out, tensorboard, (data, minionerec_root), resume, force)
        from training.data.dataset import parse_splits
        from training.rl.config import EXPLORE_SLOTS, VALUE_WARMUP, RLConfig, rollout_ved_config
        from training.rl.run import train_rl

        setup_logging()
        try:
            config = RLConfig(
                algo=algo, sibling=not no_sibling, ved=not no_ved, dense=not no_dense, epochs=epochs,
                max_steps=max_steps, batch_size=batch_size, num_candidates=num_candidates, lr=lr, value_lr=value_lr,
                value_coef=value_coef, level_weights=weights,
                beta=beta, w_sib=w_sib, sibling_norm=sibling_norm, ppo_epochs=ppo_epochs,
                ved_config=rollout_ved_config(budget, EXPLORE_SLOTS if explore_slots is None else explore_slots),
                value_warmup=VALUE_WARMUP if value_warmup is None else value_warmup,
                train_splits=tuple(parse_splits(train_splits)), holdout=holdout, eval_every=eval_every,
                eval_limit=eval_limit, fusion_weight=fusion_weight, fused_rollouts=fused_rollouts, seed=seed,
            )  # fmt: skip
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        ds = load_data(data, minionerec_root, dataset)
        require_candidates(num_candidates, ds)
        curves = tensorboard or default_curves(out)
        run_training(
            lambda dev: train_rl(ds, init, out, config, dev, resume, tensorboard=curves, precision=precision),
            device,
            json_out,
        )

    @app.command()
    def diagnose(
        checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint folder (VED needs its value head).")],
        data: DataOpt = None,
        minionerec_root: RootOpt = None,
        dataset: NameOpt = None,
        decoder: Annotated[
            Decoder, typer.Option("--decoder", help="beam: constrained beam search; ved: value-guided search.")
        ] = "beam",
        budget: Annotated[
            int | None,
            typer.Option(
                "--budget",
                min=1,
                help="Tokens per prompt: VED's budget; for beam, the widest beam whose tokens fit it (at least "
                "what width G feeds), keeping the G best.",
            ),
        ] = None,
        num_candidates: Annotated[int, typer.Option("--num-candidates", min=2, help="G, candidates per prompt.")] = 16,
        split: Annotated[Split, typer.Option("--split", help="The split whose rows are diagnosed.")] = "valid",
        limit: Annotated[int | None, typer.Option("--limit", min=1, help="Only the first N rows.")] = None,
        holdout: HoldoutOpt = None,
        explore_slots: Annotated[
            int | None,
            typer.Option("--explore-slots", min=0, help="VED: exploratory slots (default: the checkpoint's)."),
        ] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompts decoded together.")] = 32,
        seed: Annotated[
            int,
            typer.Option(
                "--seed", min=0, max=MAX_SEED, help="Seed for VED's random draws (beam search draws nothing)."
            ),
        ] = 0,
        device: DeviceOpt = "cpu",
        json_out: Annotated[
            Path | None, typer.Option("--json", help="Write the diagnostics here.", callback=writable_file)
        ] = None,
    ) -> None:
        """Candidate-set diagnostics of one decoder: reachability, non-zero-advantage share, reward std, ...;
        with a value head in the checkpoint, also its quality (rank correlation with the dense reward). A run
        trained with --fused-rollouts is decoded fused as its rollouts were."""
        require_checkpoint(checkpoint)
        if decoder == "beam" and explore_slots is not None:
            raise typer.BadParameter(
                "exploratory slots are VED's: use them with --decoder ved", param_hint="--explore-slots"
            )
        ds = load_data(data, minionerec_root, dataset)
        require_candidates(num_candidates, ds)
        rows = select_rows(ds.splits[split], limit, holdout, split)
        if not rows:  # as vstar eval: named, and before the checkpoint loads
            raise typer.BadParameter(f"the {split} split of {ds.name} has no rows to diagnose", param_hint="--split")
        from models.checkpoint import load_checkpoint
        from models.value_head import load_value_head
        from training.data.dataset import check_catalog
        from training.rl.diagnose import VALUE_KEYS, candidate_source, checkpoint_gamma, checkpoint_level_weights
        from training.rl.diagnose import diagnose as run_diagnose
        from training.rl.rows import rollout_fusion

        ckpt = load_checkpoint(checkpoint, device)
        check_catalog(ckpt.policy.catalog, ds, "--checkpoint")
        fusion = rollout_fusion(ckpt.manifest, ds)  # its run's rollouts fused: the candidate sets decoded so
        if fusion.note is not None:
            typer.echo(f"note: {fusion.note}", err=True)
        elif fusion.fusion is not None:
            typer.echo(
                f"note: decoding fused as the run's rollouts were (--fused-rollouts): weight {fusion.fusion.weight:g}, "
                f"counts of the {fusion.count_rows} rows it counted",
                err=True,
            )
        source = candidate_source(ckpt, decoder, num_candidates, budget, seed, explore_slots, fusion)
        head = load_value_head(ckpt, device, required=False)
        weights = checkpoint_level_weights(ckpt)
        if head is not None and ds.embeddings is None:  # as vstar eval warns: one line on stderr
            typer.echo(
                f"warning: the value head's quality ({', '.join(VALUE_KEYS)}) is left out: it is scored against "
                f"the dense reward, which needs {ds.name}'s item_emb.npy", err=True,
            )  # fmt: skip
        result = run_diagnose(
            ckpt.policy,
            rows,
            source,
            batch_size,
            value_head=head,
            item_emb=ds.embeddings,
            level_weights=weights,
            gamma=checkpoint_gamma(ckpt),
        )
        # what was diagnosed, as vstar eval records it: --limit above the split's size takes the rows there are
        described = {"rows": len(rows), "split": split, "decoder": decoder, "num_candidates": num_candidates}
        fused = {"rollout_fusion": fusion.record(rows), "rollout_fusion_note": fusion.note}
        write_json(json_out, result | described | fused)

    @bench.command(name="train")
    def bench_train(
        ctx: typer.Context,
        json_out: Annotated[
            Path | None,
            typer.Option("--json", help="Write {grpo_s_per_step, vstar_s_per_step} here.", callback=writable_file),
        ] = None,
        data: DataOpt = None,
        checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="Start model (default: random).")] = None,
        preset: Annotated[
            Literal["tiny", "small"], typer.Option("--preset", help="Random model preset without --checkpoint.")
        ] = "tiny",
        batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompts per step.")] = 8,
        steps: Annotated[int, typer.Option("--steps", min=1, help="Timed steps per trainer (after one warm-up).")] = 3,
        budget: BudgetOpt = None,
        threads: Annotated[
            int, typer.Option("--threads", min=0, help="torch CPU threads; 0 keeps torch's default.")
        ] = 1,
        device: DeviceOpt = "cpu",
    ) -> None:
        """Seconds per RL step of GRPO and of V-STAR on the same batch and the same start model."""
        if checkpoint is not None and data is None:
            raise typer.BadParameter("--checkpoint needs --data (the prompts to train on)")
        if checkpoint is not None and given_options(ctx, {"preset": "--preset"}):  # timed the checkpoint's model
            raise typer.BadParameter(
                "--preset builds the random model timed without --checkpoint; with it, the checkpoint's is timed"
            )
        if checkpoint is not None:
            require_checkpoint(checkpoint)
        import torch

        from training.bench.rl_bench import run_train_bench
        from training.rl.config import RLConfig

        if threads:
            torch.set_num_threads(threads)
        ds = load_data(data, None, None) if data is not None else None
        if ds is not None:  # the groups vstar rl would train on: refused as vstar rl refuses them
            require_candidates(RLConfig().num_candidates, ds)
            if ds.embeddings is None:
                raise typer.BadParameter(
                    f"{ds.name} has no item_emb.npy: V-STAR's dense reward, timed here, needs item embeddings (vstar "
                    "embed --data DIR --encoder PATH makes them from a local text encoder)",
                    param_hint="'--data'",
                )
        write_json(json_out, run_train_bench(ds, checkpoint, preset, batch_size, steps, budget, device))
