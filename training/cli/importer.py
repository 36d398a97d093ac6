"""``vstar import``: raw interaction logs to a data folder (``training.data.importer`` does the work).

``training.cli.commands`` registers it first, as the first step of a catalog of one's own. The options and
``--out`` are checked before either input is read; a bad ``--out`` is a ``ValueError`` and a bad input line a
``DataError``, which the root command prints as one line (naming the file and the line).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from training.cli.options import write_json

SPLIT_HELP = "Shares of train, valid, test, cut in the order of the rows' target timestamps (MiniOneRec's 8:1:1)."


def register_import(app: typer.Typer) -> None:
    @app.command(name="import")
    def import_cmd(
        events: Annotated[
            Path,
            typer.Option(
                "--events",
                help="Interactions: a CSV whose header has user_id, item_id, timestamp (epoch seconds or ISO 8601; "
                "other columns are ignored), or .jsonl objects with those keys.",
            ),
        ],
        items: Annotated[
            Path,
            typer.Option(
                "--items", help="Items: item_id, title and an optional description, as a .csv or .jsonl file."
            ),
        ],
        out: Annotated[Path, typer.Option("--out", help="Folder to write the data set into (new or empty).")],
        max_history: Annotated[
            int, typer.Option("--max-history", min=1, help="History items per row, the most recent (MiniOneRec's 10).")
        ] = 10,
        split: Annotated[str, typer.Option("--split", help=SPLIT_HELP)] = "0.8,0.1,0.1",
        min_interactions: Annotated[
            int,
            typer.Option(
                "--min-interactions",
                min=1,
                help="k-core filter: drop users and items with fewer events, again until none is left (MiniOneRec's "
                "data were 5-core; 1 keeps all).",
            ),
        ] = 5,
        force: Annotated[
            bool, typer.Option("--force", help="Replace an --out that an earlier vstar import wrote, whole.")
        ] = False,
    ) -> None:
        """Raw interaction logs to a data folder, as MiniOneRec's: your item ids (SKUs) become 0..N-1 (item_map.json
        maps them back), events become train/valid/test.csv rows; then vstar embed and vstar sids."""
        from training.data.importer import ImportConfig, import_log, parse_split

        try:
            config = ImportConfig(max_history, parse_split(split), min_interactions)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        stats = import_log(events, items, out, config, force)  # a bad --out or input line: one line from the root
        dropped, read = stats["dropped"], stats["read"]
        if dropped["items_without_events"]:
            typer.echo(f"note: {dropped['items_without_events']} of the {read['items']} items of {items} have no "
                       "event: left out", err=True)  # fmt: skip
        if config.min_interactions > 1:
            typer.echo(
                f"note: --min-interactions {config.min_interactions} dropped {dropped['events']} of {read['events']} "
                f"events, {dropped['users']} of {read['users']} users and {dropped['items']} items with events "
                f"({dropped['k_core_rounds']} rounds)",
                err=True,
            )
        typer.echo(f"next: vstar embed --data {out} --encoder ENCODER, then vstar sids --data {out} --update-splits",
                   err=True)  # fmt: skip
        write_json(None, stats | {"out": str(out)})
