"""The ``vstar`` console command: one entry point over training, benchmarks and serving.

Each package registers its own subcommands, so ``training`` and ``service``
never import each other (but ``vstar load-histories``, which reads a training
data folder into the service's store: ``service.load_histories``); heavy imports
happen inside the commands, after their options are checked, so a simple mistake
is reported before torch loads.

Errors: a usage error, or a ``ValueError`` raised by the project's own code (the
house rule for bad input: a malformed data file, a missing or broken
checkpoint, an invalid setting), is printed as one line, ``Error: ...``, and the
command exits with 2. A ``ValueError`` raised inside a library, and any other
exception, is a bug and keeps its traceback. Ctrl-C is one line too,
``Error: interrupted (Ctrl-C)``, with typer's exit status 130. Every float
option refuses nan and inf before its command runs (``refuse_non_finite``; one
that fails a bound first is called not finite all the same, ``option_message``,
which also drops pydantic's "Value error, " label from typer's option errors).
Running out of memory (a ``MemoryError``, or torch's ``OutOfMemoryError``) is
one line too, exit status 1: it names what was asked for, not a bug; so is an
``OSError`` that names a file (a path under /proc, which the checks before the
work do not foresee) or a full disk.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer._click.core import Command
from typer._click.exceptions import BadParameter, NoArgsIsHelpError, UsageError  # typer vendors click from 0.28 on
from typer.core import TyperGroup

from loadtests.cli import register as register_loadtests
from models.checkpoint_error import CheckpointError
from service.cli import register as register_service
from service.offline_cli import register_offline
from training.cli.baselines import register_baseline
from training.cli.commands import register as register_training
from training.cli.plot import register_plot
from training.cli.rl import register_rl

PROJECT_PACKAGES = ("models", "training", "service", "loadtests", "vstar", "__main__")
# Plain click help, not rich's: rich reads "[recipe: 20]" in a help text as markup and drops it,
# and shows flags as "<bool>" as if they took a value.
HELP: dict[str, Any] = {"rich_markup_mode": None, "context_settings": {"max_content_width": 120}}


def raised_by_project(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is the project's code (not a library's)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", "")) if tb is not None else ""
    return module.split(".")[0] in PROJECT_PACKAGES


DISTRIBUTED = ("sft", "rl")  # the commands that run across the processes of a launcher (training.distributed)
INTERRUPTED = 130  # the exit status typer gives a command that Ctrl-C (KeyboardInterrupt) stopped
RANK_GRACE_S = 5.0  # a launched rank other than 0 waits this long before it reports an error (``fail``)


def fail(message: str, code: int, grace_s: float | None = None) -> NoReturn:
    """``message`` as one line on stderr, then exit with ``code``.

    Under torchrun / accelerate launch every rank checks the same options and data, so a bad input fails on
    each of them: rank 0 reports it, and a rank other than 0 first waits ``grace_s``, in which the launcher,
    seeing rank 0 exit, stops it; one that is still running failed alone (e.g. on its own slice of the data)
    and reports it with its rank.
    """
    rank = os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"
    if rank != "0":
        time.sleep(RANK_GRACE_S if grace_s is None else grace_s)
    where = f"rank {rank}: " if rank != "0" else ""
    typer.echo(f"Error: {where}{' '.join(line.strip() for line in message.splitlines() if line.strip())}", err=True)
    sys.exit(code)


def refuse_non_finite(command: Command) -> None:
    """Every command (and subcommand) refuses nan and inf in its float options before it runs: no setting here
    means them, and nan passes every min/max check (each comparison with it is false), so ``--beta nan`` would
    train a model of nans and ``--fusion-weight nan`` would score 0 without a word."""
    callback = command.callback
    if callback is not None and not getattr(callback, "refuses_non_finite", False):
        flags = {p.name: p.opts[0] for p in command.params if p.name and p.opts}

        @functools.wraps(callback)
        def checked(*args: Any, **kwargs: Any) -> Any:
            for name, value in kwargs.items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise typer.BadParameter(f"{value} is not a finite number", param_hint=f"'{flags.get(name, name)}'")
            return callback(*args, **kwargs)

        checked.refuses_non_finite = True  # type: ignore[attr-defined]
        command.callback = checked
    for sub in getattr(command, "commands", {}).values():
        refuse_non_finite(sub)


BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")  # pydantic's error types


def not_finite(raw: object) -> bool:
    """Whether an option's text (or number) reads as nan or an infinity."""
    try:
        return not math.isfinite(float(raw))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def option_message(error: typer.TyperException) -> str:
    """click's message for a usage error. Where typer checked an option with pydantic (its type, bounds and
    choices), the reason is the check's own words: without pydantic's "Value error, " label, and nan or inf
    called not finite rather than out of a bound (nan fails every bound, as each comparison with it is false)."""
    from pydantic import ValidationError  # typer has loaded it when it checked an option with it

    from service.errors import validation_reason  # the API's 422s word a pydantic error the same way

    cause = error.__cause__
    if isinstance(error, BadParameter) and isinstance(cause, ValidationError):
        error.message = "; ".join(
            f"{err['input']} is not a finite number"
            if err["type"] in BOUNDS and not_finite(err.get("input"))
            else validation_reason(err)
            for err in cause.errors(include_url=False)
        )
    return error.format_message()


class OneLineErrors(TyperGroup):
    """The root command: the project's errors become one line on stderr and exit status 2 (see the module doc)."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        extra["windows_expand_args"] = windows_expand_args
        refuse_non_finite(self)
        command = next((a for a in (sys.argv[1:] if args is None else args) if not a.startswith("-")), None)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and command is not None and command not in DISTRIBUTED:
            # every launched process would run it whole, and write the same files at once
            fail(f"vstar {command} runs in one process: launch it without torchrun (vstar sft and vstar rl train "
                 "across processes)", 2)  # fmt: skip
        if not standalone_mode:  # the caller handles errors (the demo runs its steps this way)
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as e:  # `vstar` or `vstar bench` alone: the help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        except typer.TyperException as e:  # click's usage errors and the BadParameter our handlers raise
            ctx = e.ctx if isinstance(e, UsageError) else None
            fail(option_message(e) + (f" (see {ctx.command_path} --help)" if ctx else ""), e.exit_code)
        except typer.Abort:  # end of input at a prompt (typer's own Abort; Ctrl-C is the status 130 below)
            fail("aborted", 1, grace_s=0)
        except CheckpointError as e:  # the project's, even when it wraps a library's error
            fail(str(e), 2)
        except ValueError as e:
            if not raised_by_project(e):
                raise
            fail(str(e), 2)
        except OSError as e:  # a file the system would not read or write, or a full disk: not a bug
            if e.filename is not None:
                to = f" -> {e.filename2}" if e.filename2 is not None else ""
                fail(f"{e.filename}{to}: {e.strerror or e}", 1)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):  # a write() names no file
                fail(f"{e.strerror}: free some space, or write the output elsewhere", 1)
            if e.errno == errno.EFBIG:  # past the process's file-size limit (ulimit -f), or the file system's
                fail(f"{e.strerror}: raise the file-size limit (ulimit -f), or write the output elsewhere", 1)
            raise
        except MemoryError as e:  # numpy's says how much it asked for; Python's own says nothing
            fail(f"out of memory: {str(e) or 'an allocation failed'}: ask for less (sizes, --batch-size)", 1)
        except RuntimeError as e:
            # torch's OutOfMemoryError (CUDA's; by name: torch is not imported before a command runs), or its CPU
            # allocator's plain RuntimeError
            if type(e).__name__ != "OutOfMemoryError" and "can't allocate memory" not in str(e):
                raise
            fail(f"out of memory: {e}: ask for less (a smaller --batch-size)", 1)
        if code == INTERRUPTED:  # typer turns Ctrl-C into this status without a word, after a cut progress bar
            fail("interrupted (Ctrl-C)", INTERRUPTED, grace_s=0)  # under a launcher every rank got it: none waits
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
register_rl(app, bench)
register_baseline(app)
register_plot(app)
register_service(app, bench)
register_offline(app)
register_loadtests(app, bench)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's data, checkpoints and reports.")] = Path(
        "runs/demo"
    ),
    serve: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Start the service on the result at the end.")
    ] = True,
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port of the service (127.0.0.1).")] = 8000,
    rl_steps: Annotated[
        int,
        typer.Option("--rl-steps", min=1, help="V-STAR steps after SFT, on valid less its most recent third."),
    ] = 60,
) -> None:
    """The embedded default end to end: synthetic data, tiny model (SFT, V-STAR), test metrics, then the service."""
    from training.demo import (
        curl_command,
        demo_folder_problem,
        demo_steps,
        example_request,
        report,
        rl_holdout,
        synth_step,
    )

    def run(args: list[str]) -> None:
        typer.secho(f"$ vstar {' '.join(args)}", fg=typer.colors.CYAN, err=True)
        with contextlib.redirect_stdout(io.StringIO()):  # each step's JSON is in its file under --out
            code = app(args=args, standalone_mode=False)
        if isinstance(code, int) and code != 0:  # Ctrl-C (130) ends the step: the demo stops with it
            raise typer.Exit(code)

    problem = demo_folder_problem(out)
    if problem is not None:
        raise typer.BadParameter(problem, param_hint="--out")
    if serve and not port_is_free(port):  # before minutes of training, and before another service answers for it
        raise typer.BadParameter(
            f"127.0.0.1:{port} is in use (another process listens there): give another --port, or stop it",
            param_hint="--port",
        )
    if not (out / "data" / "index.json").exists():
        run(synth_step(out))
    for args in demo_steps(out, rl_steps, rl_holdout(out / "data")):
        run(args)
    summary = report(out, rl_steps)
    curl = curl_command(example_request(out / "data"), port)
    if not serve:
        typer.echo(f"{summary}\n\nServe the result with: vstar serve --checkpoint {out / 'vstar'} --port {port}")
        typer.echo(f"then ask it for recommendations:\n  {curl}")
        return
    typer.secho(f"starting the service on {out / 'vstar'} (its own process, JSON logs)", fg="green", err=True)
    serve_until_stopped(out / "vstar", port, f"{summary}\n\nThe service answers on http://127.0.0.1:{port}:\n  {curl}")


def port_is_free(port: int) -> bool:
    """Whether this process could listen on 127.0.0.1:``port`` now (as uvicorn binds: address reuse on)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _stop(signum: int, frame: object) -> None:
    """SIGTERM or SIGHUP to the demo while it serves: leave through ``serve_until_stopped``'s ``finally``, which
    stops the service (it would outlive the demo, holding the port)."""
    raise SystemExit(128 + signum)


def serve_until_stopped(checkpoint: Path, port: int, ready_message: str) -> None:
    """``vstar serve`` in a child process (one log format per process); ``ready_message`` once it is ready. The
    service stops with the demo: Ctrl-C reaches both, SIGTERM or SIGHUP to the demo stops it here."""
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # its request lines would be plain text amid the JSON
    from service.serve_command import serve_command

    server = subprocess.Popen(serve_command(checkpoint, port))
    handlers = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                fail(f"the service stopped with exit status {server.returncode} before it was ready (log above)", 1)
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                fail("the service was not ready after 300 s (log above)", 1)
            time.sleep(0.3)
        typer.echo(ready_message + "\n(Ctrl-C stops it)")
        if server.wait() != 0:  # not a Ctrl-C (below): it failed, whatever answered on the port meanwhile
            fail(f"the service stopped with exit status {server.returncode} (log above)", 1)
    except KeyboardInterrupt:  # Ctrl-C reached the server too: let it shut down
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=30)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if server.poll() is None:
            server.terminate()
            server.wait()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
