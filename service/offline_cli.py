"""``vstar recommend`` and ``vstar load-histories``: the service's code run offline, from the command line
(registered on the root command by ``vstar.py``).

``recommend`` reads the service's settings (its options in their place) and answers a file of users with the
service's own code (``service.batch_recommend``), reading their stored histories from the service's store with
``--stored-history``. ``load-histories`` writes the users' timelines of a data folder into that store
(``service.load_histories``), with the same settings. Heavy imports stay inside the handlers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from typer._click.exceptions import UsageError  # typer vendors click from 0.28 on

from models.atomic_folder import write_file
from models.output_path import output_file_problem
from service.cli_options import device_callback, output_file_callback, require_checkpoint, settings_from_env


def register_offline(app: typer.Typer) -> None:
    """Add ``recommend`` and ``load-histories`` to ``app``."""

    @app.command()
    def recommend(
        checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint folder to answer with.")],
        source: Annotated[
            Path,
            typer.Option(
                "--input",
                help='JSON lines, a user each: {"user_id": "...", "history": [...]} (user_id optional, any string, '
                "echoed back; history as POST /recommend takes it: item ids, SID strings, "
                '{"external_id": ...} objects, oldest first; with --stored-history a line with a user_id may '
                'leave history out). A line may add "exclude_items": [...], items never to recommend to that '
                "user, as the request's field.",
            ),
        ],
        out: Annotated[
            Path,
            typer.Option(
                "--out",
                help='JSON lines, one per user in the input\'s order: {"user_id": ..., "items": [...]}, the items '
                "POST /recommend answers.",
            ),
        ],
        k: Annotated[
            int | None,
            typer.Option("--k", min=1, help="Recommendations per user [default: VSTAR_DEFAULT_K, else 10]."),
        ] = None,
        mode: Annotated[
            Literal["beam", "ved"],
            typer.Option(
                "--mode",
                help="beam: constrained beam search; ved: value-guided search, to its whole budget (offline there "
                "is no latency cap).",
            ),
        ] = "beam",
        budget: Annotated[
            int | None,
            typer.Option("--budget", min=1, help="VED: backbone tokens per user [default: VED's own for k]."),
        ] = None,
        exclude_history: Annotated[
            bool | None,
            typer.Option(
                "--exclude-history/--no-exclude-history",
                help="Drop items the user already has [default: VSTAR_EXCLUDE_HISTORY_DEFAULT, else off].",
            ),
        ] = None,
        fusion_weight: Annotated[
            float | None,
            typer.Option(
                "--fusion-weight",
                min=0.0,
                help="Weight of the transition counts fused into the decoder [default: VSTAR_FUSION_WEIGHT, else "
                "the checkpoint's; 0: the policy alone].",
            ),
        ] = None,
        device: Annotated[
            str | None,
            typer.Option("--device", help="torch device [default: VSTAR_DEVICE, else cpu].", callback=device_callback),
        ] = None,
        batch_size: Annotated[
            int,
            typer.Option(
                "--batch-size",
                min=1,
                help="Users per batch, decoded in groups of one decode config, as the service's micro-batches.",
            ),
        ] = 64,
        force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
        stored_history: Annotated[
            bool,
            typer.Option(
                "--stored-history",
                help="Put each user_id's stored history before the line's own, as POST /recommend does, read up "
                "front from the Redis vstar serve uses (REDIS_URL); a user with neither, or a store that fails, "
                "stops the command and nothing is written.",
            ),
        ] = False,
    ) -> None:
        """Recommendations for a file of users, offline: POST /recommend's answers (settings: VSTAR_*, as vstar
        serve reads them), with no latency cap."""
        require_checkpoint(checkpoint)
        if not source.is_file():
            raise typer.BadParameter(f"{source} is not a file", param_hint="'--input'")
        problem = output_file_problem(out)
        if problem is None and out.exists() and out.resolve() == source.resolve():
            problem = f"{out} is the --input file: write the answers elsewhere"
        elif problem is None and out.exists() and not force:
            problem = f"{out} exists: give --force to replace it"
        if problem is not None:
            raise typer.BadParameter(problem, param_hint="'--out'")
        if mode == "beam" and budget is not None:
            raise typer.BadParameter(
                "applies to --mode ved only: beam search has no token budget", param_hint="'--budget'"
            )
        given = {"device": device, "fusion_weight": fusion_weight}
        # the service's settings; offline nothing is stored or cached, and the first batch is the warm-up
        overrides: dict[str, Any] = {
            "checkpoint": checkpoint,
            "warmup": False,
            "cache_ttl_s": 0,
            **{name: value for name, value in given.items() if value is not None},
        }
        settings = settings_from_env(redis_url=None, **overrides)
        store = None
        if stored_history:  # the store vstar serve uses in this environment, read up front (service.batch_recommend)
            from service.app import build_store

            served = settings_from_env(**overrides)
            if served.redis_url is None:
                raise typer.BadParameter(
                    "needs REDIS_URL (or VSTAR_REDIS_URL), the Redis vstar serve stores histories in: without it each "
                    "server process keeps its own in memory, which no other process can read",
                    param_hint="'--stored-history'",
                )
            store = build_store(served)
        fields = {
            "k": settings.default_k if k is None else k,
            "mode": mode,
            "budget": budget,
            "exclude_history": exclude_history,
        }
        from transformers.utils import logging as hf_logging

        from service.batch_recommend import recommend_file

        hf_logging.disable_progress_bar()  # its "Loading weights" bar; the command's own is the decode's
        report = recommend_file(settings, source, out, fields, batch_size, store=store)
        rate = report.users / report.seconds if report.seconds > 0 else float("inf")
        stored = ""
        if report.stored_users is not None:
            stored = f"; a stored history for {report.stored_users} of them"
            if report.skipped:
                stored += f", {report.skipped} stored entries the catalog no longer knows skipped"
        typer.echo(
            f"{report.users} users -> {out}: {report.seconds:.2f} s, {rate:.1f} users/s ({mode}, k {fields['k']}, "
            f"--batch-size {batch_size}; after loading the model and checking every line){stored}"
        )

    @app.command(name="load-histories")
    def load_histories(
        data: Annotated[
            Path,
            typer.Option("--data", help="Data folder (train.csv, valid.csv, test.csv, index.json, item.json)."),
        ],
        splits: Annotated[
            str, typer.Option("--splits", help="Comma list of the splits whose rows make the users' timelines.")
        ] = "train,valid,test",
        skip_existing: Annotated[
            bool, typer.Option("--skip-existing", help="Load only the users with nothing stored; leave the others.")
        ] = False,
        append: Annotated[
            bool, typer.Option("--append", help="Append each timeline after what the user has stored.")
        ] = False,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Read the data and the stored histories; write nothing.")
        ] = False,
        json_out: Annotated[
            Path | None, typer.Option("--json", help="Write the report here too.", callback=output_file_callback)
        ] = None,
    ) -> None:
        """Write the users' histories of a data folder into the Redis vstar serve stores them in (REDIS_URL;
        VSTAR_* settings as vstar serve reads them), so a user_id from the data is answered from it at once."""
        from training.data.dataset import parse_splits

        if skip_existing and append:
            raise typer.BadParameter("give --skip-existing or --append, not both", param_hint="'--append'")
        try:
            named = parse_splits(splits)
        except ValueError as e:
            raise typer.BadParameter(str(e).replace("--train-splits", "--splits"), param_hint="'--splits'") from None
        # no model is loaded: the device is never read, and the GPU image's VSTAR_DEVICE=cuda runs without a GPU
        # here (the compose histories profile)
        settings = settings_from_env(device="cpu")
        if settings.redis_url is None:
            raise UsageError(
                "vstar load-histories needs REDIS_URL (or VSTAR_REDIS_URL), the Redis vstar serve stores histories "
                "in: without it each server process keeps its own in memory, and this command's would be gone when "
                "it exits"
            )
        from service.app import build_store
        from service.load_histories import LISTED, REDIS_TIMEOUT_S, Mode, read_timelines
        from service.load_histories import load_histories as load

        if settings.redis_timeout_s < REDIS_TIMEOUT_S:  # a request's bound, not a bulk write's (the module's doc)
            settings = settings_from_env(device="cpu", redis_timeout_s=REDIS_TIMEOUT_S)

        catalog, timelines = read_timelines(data, named, settings.max_user_id_length)
        store = build_store(settings)
        mode: Mode = "skip-existing" if skip_existing else "append" if append else "new"
        report = load(store, catalog, timelines, settings.stored_history_max, mode, dry_run)
        rate = report.users / report.seconds if report.seconds > 0 else float("inf")
        verb = "would load" if dry_run else "loaded"
        typer.echo(
            f"{'dry run: ' if dry_run else ''}{report.loaded} of {report.users} users {verb} "
            f"({report.appended_to} after their stored entries), {report.already_loaded} already loaded, "
            f"{report.skipped} skipped; {report.entries} entries ({report.capped} timelines cut to "
            f"VSTAR_STORED_HISTORY_MAX {settings.stored_history_max}) -> {store.describe()}: "
            f"{report.seconds:.2f} s, {rate:.0f} users/s"
        )
        if report.changed:  # --append only (service.load_histories)
            listed = ", ".join(map(repr, report.changed_users)) + (", ..." if report.changed > LISTED else "")
            who = "1 user's stored history" if report.changed == 1 else f"{report.changed} users' stored histories"
            typer.echo(
                f"{who} changed while the command ran ({listed}): not written; run the same command again to "
                "append each timeline after what is stored now, their new events included, or leave them as they are"
            )
        if json_out is not None:
            result = report.to_json() | {"data": str(data), "splits": named, "mode": mode, "store": store.describe()}
            json_out.parent.mkdir(parents=True, exist_ok=True)
            write_file(json_out, (json.dumps(result, indent=2) + "\n").encode())
