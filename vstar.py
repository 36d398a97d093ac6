"""The ``vstar`` console command: one entry point over training, benchmarks and serving.

Each package registers its own subcommands, so ``training`` and ``service``
never import each other; heavy imports happen inside the commands.
"""

from __future__ import annotations

import typer

from loadtests.cli import register as register_loadtests
from service.cli import register as register_service
from training.cli import register as register_training

app = typer.Typer(help="V-STAR generative recommender: data, training, evaluation and serving.", no_args_is_help=True)
bench = typer.Typer(help="Benchmarks that print figures and ratios against a reference measured in the same run.", no_args_is_help=True)
app.add_typer(bench, name="bench")
register_training(app, bench)
register_service(app, bench)
register_loadtests(app, bench)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
