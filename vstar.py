"""The ``vstar`` console command: one entry point over training, benchmarks and serving.

Each package registers its own subcommands, so ``training`` and ``service``
never import each other; heavy imports happen inside the commands, after their
options are checked, so a simple mistake is reported before torch loads.

Errors: a usage error, or a ``ValueError`` raised by the project's own code (the
house rule for bad input: a malformed data file, a missing or broken
checkpoint, an invalid setting), is printed as one line, ``Error: ...``, and the
command exits with 2. A ``ValueError`` raised inside a library, and any other
exception, is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer._click.exceptions import NoArgsIsHelpError  # typer >= 0.29 vendors click
from typer.core import TyperGroup

from loadtests.cli import register as register_loadtests
from service.cli import register as register_service
from training.cli import register as register_training

PROJECT_PACKAGES = ("models", "training", "service", "loadtests", "vstar", "__main__")
# Plain click help, not rich's: rich reads "[recipe: 20]" in a help text as markup and drops it,
# and shows flags as "<bool>" as if they took a value.
HELP = {"rich_markup_mode": None, "context_settings": {"max_content_width": 120}}


def raised_by_project(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is the project's code (not a library's)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", "")) if tb is not None else ""
    return module.split(".")[0] in PROJECT_PACKAGES


def fail(message: str, code: int) -> NoReturn:
    typer.echo(f"Error: {' '.join(line.strip() for line in message.splitlines() if line.strip())}", err=True)
    sys.exit(code)


class OneLineErrors(TyperGroup):
    """The root command: the project's errors become one line on stderr and exit status 2 (see the module doc)."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:  # the caller handles errors (the demo runs its steps this way)
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as e:  # `vstar` or `vstar bench` alone: the help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        except typer.TyperException as e:  # click's usage errors and the BadParameter our handlers raise
            ctx = getattr(e, "ctx", None)
            fail(e.format_message() + (f" (see {ctx.command_path} --help)" if ctx else ""), e.exit_code)
        except typer.Abort:
            fail("aborted", 1)
        except ValueError as e:
            if not raised_by_project(e):
                raise
            fail(str(e), 2)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    help="V-STAR generative recommender: data, training, evaluation and serving.",
    no_args_is_help=True,
    **HELP,
)
bench = typer.Typer(
    help="Benchmarks that print figures and ratios against a reference measured in the same run.",
    no_args_is_help=True,
    **HELP,
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
        app(args=args, standalone_mode=False)
    if serve:
        typer.secho(f"serving {rl} on http://127.0.0.1:{port} (Ctrl-C stops it)", fg=typer.colors.GREEN, err=True)
        app(args=["serve", "--checkpoint", str(rl), "--host", "127.0.0.1", "--port", str(port)], standalone_mode=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
