"""Training-side subcommands of ``vstar``: synth, embed, sids, eval and fuse.

Import (``training.cli.importer``, registered from here, first), SFT
(``training.cli.sft``, registered from here, between sids and eval), bench
decode, ved and catalog (``training.cli.bench``, registered from here), the RL
stage (``training.cli.rl``), the baselines (``training.cli.baselines``) and the
plots (``training.cli.plot``) have modules of their own; ``vstar.py`` registers
the last three, and all of them share ``training.cli.options``.

Handlers parse options, build configs and call the modules that do the work;
heavy imports stay inside the handlers so ``vstar --help`` is instant. Each
handler checks its options (choices at parse time, configs built from light
modules, checkpoint folders by their manifest) before it imports torch or reads
data, so a simple mistake is reported in well under a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from models.checkpoint_error import CheckpointError
from training.cli.bench import register_bench
from training.cli.importer import register_import
from training.cli.options import (
    MAX_SEED,
    DataOpt,
    Decoder,
    DeviceOpt,
    HoldoutOpt,
    NameOpt,
    RootOpt,
    Split,
    TailSplitsOpt,
    float_list,
    given_options,
    load_data,
    local_model,
    read_manifest,
    require_checkpoint,
    select_rows,
    setup_logging,
    writable_file,
    write_json,
)
from training.cli.sft import register_sft


def register(app: typer.Typer, bench: typer.Typer) -> None:
    register_import(app)

    @app.command()
    def synth(
        out: Annotated[Path, typer.Option("--out", help="Folder to write the synthetic data set into.")],
        items: Annotated[int, typer.Option("--items", help="Catalog size (at least 5).")] = 600,
        users: Annotated[int, typer.Option("--users", min=1, help="Number of users.")] = 400,
        seed: Annotated[
            int,
            typer.Option("--seed", min=0, max=MAX_SEED, help="Seed for the catalog, the users and the SIDs' k-means."),
        ] = 0,
        codebook_size: Annotated[
            int | None,
            typer.Option(
                "--codebook-size",
                min=2,
                help="SID codes per level (default: a power of two, C*C >= items, 4..256, raised to C^levels >= items)",
            ),
        ] = None,
        force: Annotated[
            bool,
            typer.Option(
                "--force", help="Replace a synthetic data set of other settings at --out (the same ones regenerate it)."
            ),
        ] = False,
    ) -> None:
        """Synthetic data set in the --data layout: taxonomy catalog, drifting users, time split, k-means SIDs."""
        from training.data.sid_builder import SidBuildConfig
        from training.data.synth import SynthConfig, write_synth

        try:
            config = SynthConfig(items=items, users=users, seed=seed)
            stats = write_synth(out, config, SidBuildConfig(codebook_size, seed=seed), force)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        write_json(None, stats)

    @app.command()
    def embed(
        data: Annotated[Path, typer.Option("--data", help="Folder with item.json (item id -> title, description).")],
        encoder: Annotated[
            Path,
            typer.Option(
                "--encoder",
                help="Local text encoder folder (any transformers AutoModel, e.g. all-MiniLM-L6-v2); "
                "nothing is downloaded.",
                callback=local_model,
            ),
        ],
        pooling: Annotated[
            Literal["mean", "cls", "last"] | None,
            typer.Option("--pooling", help="Token pooling (default: the encoder folder's, else mean)."),
        ] = None,
        max_length: Annotated[
            int | None,
            typer.Option("--max-length", min=1, help="Tokens per text (default: the encoder folder's, else <= 512)."),
        ] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Texts per forward pass.")] = 64,
        device: DeviceOpt = "cpu",
        force: Annotated[
            bool, typer.Option("--force", help="Replace an existing item_emb.npy and item_emb.json.")
        ] = False,
        json_out: Annotated[
            Path | None, typer.Option("--json", help="Also write the report here.", callback=writable_file)
        ] = None,
    ) -> None:
        """Item text embeddings (item_emb.npy, L2-normalised, row i = item id i) from item.json, for vstar sids."""
        from training.data.item_embed import EmbedConfig, embed_items

        config = EmbedConfig(encoder, pooling, max_length, batch_size, device)
        try:
            report = embed_items(data, config, force)
        except (ValueError, FileExistsError) as e:  # DataError and EncoderError among them
            raise typer.BadParameter(str(e)) from None
        write_json(json_out, report)

    @app.command()
    def sids(
        data: Annotated[Path, typer.Option("--data", help="Folder with item_emb.npy (row i = item id i).")],
        codebook_size: Annotated[
            int | None,
            typer.Option(
                "--codebook-size",
                min=2,
                help="SID codes per level (default: a power of two, C*C >= items, 4..256, raised to C^levels >= items)",
            ),
        ] = None,
        levels: Annotated[int, typer.Option("--levels", min=1, max=8, help="Tokens per SID.")] = 3,
        seed: Annotated[int, typer.Option("--seed", min=0, max=MAX_SEED, help="Seed for the k-means.")] = 0,
        out: Annotated[Path | None, typer.Option("--out", help="index.json to write (default DIR/index.json).")] = None,
        force: Annotated[bool, typer.Option("--force", help="Overwrite an existing index.json.")] = False,
        update_splits: Annotated[
            bool,
            typer.Option(
                "--update-splits",
                help="Also rewrite the SID columns of DIR's train/valid/test.csv to the new index (other columns "
                "stay); every file is checked before anything is written.",
            ),
        ] = False,
        json_out: Annotated[
            Path | None, typer.Option("--json", help="Also write the report here.", callback=writable_file)
        ] = None,
    ) -> None:
        """Balanced residual k-means SIDs from item_emb.npy; prints collision rates and codebook usage."""
        from training.data.sid_builder import SidBuildConfig, write_index

        config = SidBuildConfig(codebook_size, levels=levels, seed=seed)
        try:
            report = write_index(data, config, out, force, update_splits)
        except (ValueError, FileExistsError) as e:
            raise typer.BadParameter(str(e)) from None
        write_json(json_out, report)

    register_sft(app)
    VED_ONLY = {"budget": "--budget", "explore_slots": "--explore-slots"}  # eval's options that beam search ignores

    @app.command(name="eval")
    def eval_cmd(
        ctx: typer.Context,
        checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint folder.")],
        data: DataOpt = None,
        minionerec_root: RootOpt = None,
        dataset: NameOpt = None,
        split: Annotated[
            Split, typer.Option("--split", help="The split to score (train: how well a model fits its own rows).")
        ] = "test",
        beams: Annotated[
            int,
            typer.Option(
                "--beams",
                min=1,
                help="Beam width; also the length of each ranked list (at most the catalog's SIDs: a wider one "
                "runs that many, with a note).",
            ),
        ] = 50,
        decoder: Annotated[
            Decoder, typer.Option("--decoder", help="beam: constrained beam search; ved: value-guided search.")
        ] = "beam",
        budget: Annotated[int | None, typer.Option("--budget", min=1, help="VED token budget per prompt.")] = None,
        limit: Annotated[int | None, typer.Option("--limit", min=1, help="Evaluate only the first N rows.")] = None,
        holdout: HoldoutOpt = None,
        explore_slots: Annotated[
            int,
            typer.Option(
                "--explore-slots",
                min=0,
                help="VED: slots given to first-level codes the rest missed (RL's groups use them; 0: by score).",
            ),
        ] = 0,
        batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompts decoded together.")] = 32,
        train_splits: TailSplitsOpt = "train",
        fusion_weight: Annotated[
            float | None,
            typer.Option(
                "--fusion-weight",
                min=0.0,
                help="Weight of the transition counts fused into the decoder (default: the checkpoint's; 0: off).",
            ),
        ] = None,
        device: DeviceOpt = "cpu",
        json_out: Annotated[
            Path | None,
            typer.Option("--json", help="Write {metrics, rows, seconds, ...} here.", callback=writable_file),
        ] = None,
    ) -> None:
        """HR@K / NDCG@K (MiniOneRec's definitions), catalog coverage and long-tail share on a split."""
        from training.data.dataset import counted_splits

        given = given_options(ctx, VED_ONLY)
        if decoder == "beam" and given:  # a report must not look configured by an option its decoder never read
            what = "is a VED option" if len(given) == 1 else "are VED options"
            raise typer.BadParameter(
                f"{', '.join(given)} {what}, which beam search would ignore: use with --decoder ved"
            )

        context_splits = counted_splits(train_splits)
        require_checkpoint(checkpoint)
        ds = load_data(data, minionerec_root, dataset)
        rows = select_rows(ds.splits[split], limit, holdout, split)
        if not rows:
            raise typer.BadParameter(f"the {split} split of {ds.name} has no rows to score", param_hint="--split")
        from models.checkpoint import load_checkpoint
        from models.transition import checkpoint_fusion
        from training.data.dataset import check_catalog
        from training.evaluation.decoders import make_decoder
        from training.evaluation.evaluate import evaluate

        ckpt = load_checkpoint(checkpoint, device)
        check_catalog(ckpt.policy.catalog, ds, "--checkpoint")
        beams_note, sids = None, len(ckpt.policy.catalog.sids)
        if beams > sids:  # the lists hold every SID at most, as the service's for a k above the catalog
            beams_note = f"--beams {beams} is more than the {sids} SIDs of the catalog: ran {sids}, lists of every SID"
            typer.echo(f"note: {beams_note}", err=True)
            beams = sids
        try:
            try:
                fusion = checkpoint_fusion(ckpt, fusion_weight)
            except ValueError as e:
                raise ValueError(f"{e}; use --fusion-weight 0") from None
            fusion_counts = None if fusion is None else "checkpoint"
            recorded = ckpt.manifest.get("data")
            # counts of another data set's rows may hold this one's scored rows (a split re-drawn by import)
            foreign = fusion is not None and recorded is not None and not ds.trained(recorded)
            if fusion is not None and (split == "valid" or foreign):
                # the stored counts hold every row before test, the scored valid rows too: fit on the rows before
                from training.evaluation.fusion import refit_before

                valid = ds.splits["valid"]
                # train: the rows scored themselves, counted below as they are in the stored counts
                valid_before = {"test": valid, "valid": valid[: len(valid) - holdout if holdout else 0], "train": []}
                before = [*ds.samples(["train"]), *valid_before[split]]
                fusion = refit_before(fusion, before)
                rows_fit = (
                    f"{len(before)} train rows" if split == "train" else f"{len(before)} rows before the scored ones"
                )
                fusion_counts = f"refit on the {rows_fit}"
                if foreign:
                    fusion_counts += f" of {ds.name}: the checkpoint's counts are another data set's"
                    typer.echo(
                        f"note: {checkpoint} was trained on other data than {ds.name!r} (fingerprints differ): its "
                        f"transition counts could hold the scored rows' own answers, so they are fit again on this "
                        f"data's {rows_fit}",
                        err=True,
                    )
            spent_budget = None
            if decoder == "ved":  # the budget named by where it came from: --budget, or the checkpoint's
                from models.ved_config import budget_problem, checkpoint_ved_config, resolve_budget

                ved = checkpoint_ved_config(ckpt, beams, budget, explore_slots=explore_slots)
                problem = budget_problem(ved, ckpt.policy.trie.depth, budget)
                if problem is not None:
                    raise ValueError(problem)
                spent_budget = resolve_budget(ved, ckpt.policy.trie.depth)
            decode = make_decoder(ckpt, decoder, beams, budget, fusion, explore_slots)
        except CheckpointError:
            raise  # one line from the root command
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        # train rows scored fused meet their own answer in the stored counts
        counted = (
            sum(fusion.counts.counted(r.history, r.target) for r in rows)
            if fusion is not None and split == "train"
            else None
        )
        if counted:
            typer.echo(
                f"warning: the checkpoint's transition counts include the own transition (last history item -> "
                f"target) of {counted} of the {len(rows)} {split} rows scored: fused, they are scored with counts "
                "that point to their answers, so the figures are optimistic (--fusion-weight 0: the policy alone)",
                err=True,
            )
        result = evaluate(ckpt.policy, rows, ds.samples(context_splits), decode, batch_size)
        result |= {
            "own_transitions_counted": counted,
            "fusion_counts": fusion_counts,
            "split": split,
            "decoder": decoder,
            "beams": beams,  # the width run (--beams, at most the catalog's SIDs)
            "beams_note": beams_note,
            "budget": spent_budget,  # VED's, as resolved (the checkpoint's own when --budget is not given)
            "explore_slots": explore_slots if decoder == "ved" else None,
            "fusion_weight": fusion.weight if fusion else 0.0,
            "checkpoint": str(checkpoint),
        }
        write_json(json_out, result)

    @app.command()
    def fuse(
        checkpoint: Annotated[
            Path, typer.Option("--checkpoint", help="SFT or RL checkpoint trained with held-out rows.")
        ],
        data: DataOpt = None,
        minionerec_root: RootOpt = None,
        dataset: NameOpt = None,
        weights: Annotated[
            str | None,
            typer.Option(
                "--weights", help="Comma list of fusion weights to score on the held-out rows (default: SFT's grid)."
            ),
        ] = None,
        device: DeviceOpt = "cpu",
        json_out: Annotated[
            Path | None, typer.Option("--json", help="Write the choice and its grid here.", callback=writable_file)
        ] = None,
    ) -> None:
        """Choose a checkpoint's fusion weight on its held-out rows and store it, as SFT does when it ends.

        SFT or RL checkpoints: the rows its run held out select (the first --eval-limit), with counts of every
        row before them; a run that held nothing out is refused and keeps its weight."""
        grid = None if weights is None else float_list(weights, "--weights")  # "" is an empty list, not the default
        if grid is not None and min(grid) < 0:  # told now, not once the checkpoint and the data are loaded
            raise typer.BadParameter(f"fusion weights must be >= 0, got {weights!r}", param_hint="--weights")
        stage = read_manifest(require_checkpoint(checkpoint)).get("stage")
        if stage not in ("sft", "rl"):
            raise typer.BadParameter(f"{checkpoint} is a {stage!r} checkpoint; fuse takes SFT or RL ones")
        setup_logging()
        ds = load_data(data, minionerec_root, dataset)
        from training.evaluation.fusion import FUSION_WEIGHTS
        from training.rl.rows import fuse_rl_checkpoint
        from training.sft.trainer import fuse_checkpoint

        fuse_stage = fuse_rl_checkpoint if stage == "rl" else fuse_checkpoint
        try:
            write_json(json_out, fuse_stage(checkpoint, ds, grid or FUSION_WEIGHTS, device=device))
        except CheckpointError:
            raise  # one line from the root command
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None

    register_bench(bench)
