"""``vstar loadtest`` (registered on the root command by ``vstar.py``).

Option parsing only; ``loadtests.runner`` does the work and is imported inside
the handler so ``vstar --help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from typer._click.exceptions import ClickException  # typer vendors click from 0.28 on

from models.output_path import output_folder_problem


def _out_folder(path: Path) -> Path:
    """Typer callback of ``--out``: a folder or a new path this process may create, checked before the server is
    waited for and any load is sent (the report is published there after the last point). What it holds (an
    earlier report needs ``--force``) is ``run_plan``'s first check, before the server is waited for too."""
    problem = output_folder_problem(path)
    if problem is not None:
        raise typer.BadParameter(problem)
    return path


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add ``loadtest`` to ``app``; ``bench`` is unused (load tests are not benchmarks with ratios)."""

    @app.command()
    def loadtest(
        host: Annotated[
            str, typer.Option("--host", help="Service base URL on this machine, e.g. http://127.0.0.1:8000.")
        ],
        out: Annotated[
            Path,
            typer.Option(
                "--out",
                help="Folder for table.md, latency.png, results.json and raw/ (new or empty; one holding an earlier "
                "run's needs --force).",
                callback=_out_folder,
            ),
        ],
        data: Annotated[Path, typer.Option("--data", help="Data set folder; histories come from <data>/<split>.csv.")],
        users: Annotated[str, typer.Option("--users", help="Comma list of concurrent user counts.")] = "1,8,32",
        duration: Annotated[str, typer.Option("--duration", help="Measured time per point: 30s, 2m, 1m30s.")] = "30s",
        modes: Annotated[str, typer.Option("--modes", help="beam,ved or one of them.")] = "beam,ved",
        k: Annotated[int, typer.Option("--k", min=1, help="Items per request.")] = 10,
        budget: Annotated[int | None, typer.Option("--budget", min=1, help="VED tokens (unset: server's).")] = None,
        latency_ms: Annotated[
            int | None, typer.Option("--latency-ms", min=1, help="VED cap, ms (unset: server's).")
        ] = None,
        event_share: Annotated[
            float, typer.Option("--event-share", min=0.0, max=1.0, help="Share posting events.")
        ] = 0.1,
        exclude_history: Annotated[bool, typer.Option("--exclude-history", help="Drop history items.")] = False,
        split: Annotated[str, typer.Option("--split", help="Split whose histories are sent.")] = "test",
        seed: Annotated[int, typer.Option("--seed", help="Seed of the history draws.")] = 0,
        api_key: Annotated[
            str,
            typer.Option(
                "--api-key",
                envvar="VSTAR_LT_API_KEY",
                show_envvar=True,
                help="X-API-Key of the event posts, for a server with VSTAR_API_KEYS.",
            ),
        ] = "",
        force: Annotated[
            bool,
            typer.Option(
                "--force",
                help="Replace an earlier run's results at --out, whole, when this run ends (a run cut short "
                "leaves them, and publishes the points it measured in <out>.partial-<UTC start> beside them).",
            ),
        ] = False,
    ) -> None:
        """Locust, headless, beam vs VED at several concurrencies: Markdown table and latency plot (loopback only)."""
        from loadtests.runner import LoadTestPlan, parse_duration, parse_users, run_plan

        try:
            plan = LoadTestPlan(
                host=host, data=data, out=out, users=parse_users(users), duration_s=parse_duration(duration),
                modes=tuple(dict.fromkeys(m.strip() for m in modes.split(","))), k=k, budget=budget,
                latency_ms=latency_ms, event_share=event_share, exclude_history=exclude_history, split=split, seed=seed,
                api_key=api_key,
            )  # fmt: skip
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        try:
            _, paths = run_plan(plan, echo=typer.echo, force=force)
        except ValueError as e:  # --out's contents, --host, --data: before any load is sent
            raise typer.BadParameter(str(e)) from None
        except RuntimeError as e:  # the server never got ready, or a locust run failed: the run's error, one line
            raise ClickException(str(e)) from None
        typer.echo(paths["table"].read_text())
        typer.echo(f"wrote {paths['table']}, {paths['plot']}, {paths['json']}")
