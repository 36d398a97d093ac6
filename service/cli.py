"""``vstar serve`` and ``vstar bench serve`` (registered on the root command)."""

from __future__ import annotations

import typer


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Service commands are added by the service issue."""
