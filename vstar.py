"""The ``vstar`` console command: one entry point over training, benchmarks and serving.

Each package registers its own subcommands, so ``training`` and ``service``
never import each other; heavy imports happen inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from loadtests.cli import register as register_loadtests
from models.checkpoint_error import CheckpointError
from service.cli import register as register_service
from training.cli import register as register_training


class Commands(TyperGroup):
    """The root command: a bad checkpoint ends any subcommand with one line naming the file, no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CheckpointError as e:
            typer.echo(f"Error: {e}", err=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    help="V-STAR generative recommender: data, training, evaluation and serving.", no_args_is_help=True, cls=Commands
)
bench = typer.Typer(
    help="Benchmarks that print figures and ratios against a reference measured in the same run.", no_args_is_help=True
)
app.add_typer(bench, name="bench")
register_training(app, bench)
register_service(app, bench)
register_loadtests(app, bench)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's data, checkpoints and reports.")] = Path(
        "runs/demo"
    ),
    serve: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Start the service on the result at the end.")
    ] = True,
    port: Annotated[int, typer.Option("--port", help="Port of the service (127.0.0.1).")] = 8000,
    rl_steps: Annotated[int, typer.Option("--rl-steps", min=1, help="V-STAR steps after SFT.")] = 30,
) -> None:
    """The embedded default end to end: synthetic data, tiny model (SFT, V-STAR), test metrics, then the service."""
    data, sft, rl = out / "data", out / "sft", out / "vstar"
    steps = [
        ["synth", "--out", str(data)] if not (data / "index.json").exists() else None,
        [
            "sft",
            "--data",
            str(data),
            "--out",
            str(sft),
            "--preset",
            "tiny",
            "--epochs",
            "8",
            "--lr",
            "5e-3",
            "--json",
            str(out / "sft.json"),
        ],
        [
            "eval",
            "--data",
            str(data),
            "--checkpoint",
            str(sft),
            "--split",
            "test",
            "--json",
            str(out / "sft.test.json"),
        ],
        [
            "rl",
            "--data",
            str(data),
            "--init",
            str(sft),
            "--out",
            str(rl),
            "--algo",
            "vstar",
            "--max-steps",
            str(rl_steps),
            "--eval-every",
            str(rl_steps),
            "--json",
            str(out / "vstar.json"),
        ],
        [
            "eval",
            "--data",
            str(data),
            "--checkpoint",
            str(rl),
            "--split",
            "test",
            "--json",
            str(out / "vstar.test.json"),
        ],
    ]
    for args in filter(None, steps):
        typer.secho(f"$ vstar {' '.join(args)}", fg=typer.colors.CYAN, err=True)
        code = app(args=args, standalone_mode=False)  # a step that failed with its one-line error returns its code
        if code:
            raise typer.Exit(code)
    if serve:
        typer.secho(f"serving {rl} on http://127.0.0.1:{port} (Ctrl-C stops it)", fg=typer.colors.GREEN, err=True)
        app(args=["serve", "--checkpoint", str(rl), "--host", "127.0.0.1", "--port", str(port)], standalone_mode=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
