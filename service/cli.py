"""``vstar serve``, ``vstar recommend``, ``vstar load-histories`` and ``vstar bench serve`` (on the root command).

``serve`` hands the checkpoint to the app through ``VSTAR_CHECKPOINT``, so every
uvicorn worker process builds its app from the same environment
(``service.app:create_app_from_env``); every other setting is read there too
(``service.settings``). ``recommend`` reads the same settings (its options in their
place) and answers a file of users offline with the service's own code
(``service.batch_recommend``), reading their stored histories from the service's
store with ``--stored-history``. ``load-histories`` writes the users' timelines of a data folder into that
store (``service.load_histories``), with the same settings. Heavy imports stay inside the handlers.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from typer._click.exceptions import ClickException, UsageError  # typer vendors click from 0.28 on

from models.atomic_folder import write_file
from models.output_path import output_file_problem

if TYPE_CHECKING:
    import uvicorn

    from service.settings import Settings

CheckpointOpt = Annotated[Path, typer.Option("--checkpoint", help="Checkpoint folder to serve.")]


def _require_checkpoint(path: Path) -> None:
    """A folder with a manifest, checked before a server starts (after the other options' own checks)."""
    if not (path / "manifest.json").exists():
        raise typer.BadParameter(f"{path} is not a checkpoint folder (no manifest.json)")


def _device(value: str | None) -> str | None:
    """Typer callback of ``--device``: one this machine has (torch is imported only for one other than the CPU)."""
    if value is None or value == "cpu":
        return value
    from models.device import device_problem

    problem = device_problem(value)
    if problem is not None:
        raise typer.BadParameter(problem)
    return value


def _int_list(text: str, name: str) -> tuple[int, ...]:
    """``text`` as a comma list of positive integers (client counts, caps in ms), or a one-line error naming the
    option ``name``, as ``training.cli.options.int_list`` words it."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = (0,)
    if any(v < 1 for v in values):
        raise typer.BadParameter(f"expected a comma list of positive integers, got {text!r}", param_hint=name)
    if not values:
        raise typer.BadParameter("empty list", param_hint=name)
    return values


def _is_loopback(host: str) -> bool:
    """Every address ``host`` names is a loopback one (a name that does not resolve is not)."""
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (socket.gaierror, ValueError):
        return False


def _listen_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on ``host``:``port`` (a name that does not resolve, an address not of this
    machine, a port in use), or None: bound and let go as uvicorn binds (``Config.bind_socket``), before the
    model loads. uvicorn's own error names neither the host nor the port: "[Errno 98] Address already in use"."""
    with socket.socket(family=socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            return f"cannot listen on {host}:{port}: {e.strerror or e}"
    return None


def _output_file(path: Path | None) -> Path | None:
    """Typer callback of ``--json``: a path that can take the file, checked before the benchmark runs."""
    problem = None if path is None else output_file_problem(path)
    if problem is not None:
        raise typer.BadParameter(problem)
    return path


def _variable(loc: tuple[int | str, ...]) -> str:
    """``"VSTAR_MAX_K: "`` for a setting's error location, the environment variable it is read from; ``""`` for
    an error of several settings (their names are in its message)."""
    if not loc:
        return ""
    field = str(loc[0]).lower()  # redis_url's error is located at the alias it was read from (REDIS_URL)
    return (
        "REDIS_URL (or VSTAR_REDIS_URL)" if field.removeprefix("vstar_") == "redis_url" else f"VSTAR_{field.upper()}"
    ) + ": "


def _settings(**overrides: Any) -> Settings:
    """The service's settings from the environment, ``overrides`` (options already checked) in their place;
    a bad one is one line naming its variable, never its value: it may be a password or a key."""
    from pydantic import ValidationError

    from service.errors import validation_reason
    from service.settings import Settings

    try:
        return Settings(**overrides)
    except ValidationError as e:
        problems = "; ".join(
            f"{_variable(err['loc'])}{validation_reason(err)}"
            for err in e.errors(include_url=False, include_input=False)
        )
        raise typer.BadParameter(f"bad VSTAR_* settings in the environment: {problems}") from None


def _caps_the_server_takes(caps: Sequence[int], k: int) -> None:
    """``--caps`` within the served ``VSTAR_VED_MAX_LATENCY_MS`` and ``--k`` within its ``VSTAR_MAX_K`` (read from
    the environment the server gets): a value above is refused in every request (422), its cell measures nothing."""
    from service.settings import Settings

    try:
        settings = Settings()
    except ValueError:  # a bad VSTAR_* setting: the server's start names it
        return
    if k > settings.max_k:
        raise typer.BadParameter(f"{k} is above the server's VSTAR_MAX_K ({settings.max_k})", param_hint="--k")
    limit = settings.ved_max_latency_ms
    over = [c for c in caps if c > limit]
    if over:
        raise typer.BadParameter(
            f"{over[0]} ms is above the server's VSTAR_VED_MAX_LATENCY_MS ({limit} ms), which refuses it in every "
            "request: give caps up to it, or raise it", param_hint="--caps"
        )  # fmt: skip


def _write_result(result: dict[str, Any], json_out: Path | None) -> None:
    """The benchmark's rows on stdout and in ``json_out``; a figure never measured is null, never NaN."""
    text = json.dumps(result, indent=2, allow_nan=False)
    typer.echo(text)  # first: a write that fails (a path the checks before the run could not foresee) loses nothing
    if json_out is not None:  # replaced in one step: a write cut short leaves an earlier result whole
        json_out.parent.mkdir(parents=True, exist_ok=True)
        write_file(json_out, (text + "\n").encode())


def _run(config: uvicorn.Config) -> None:
    """What ``uvicorn.run`` does with ``config``, but a start that failed exits with ``STARTUP_FAILURE`` (3)
    with several workers too: ``uvicorn.run`` then stops them all and returns, so the command would exit 0."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    class Supervisor(Multiprocess):
        """Restarts a worker that died, as uvicorn's does, and takes its live gauges out of the scrape."""

        def keep_subprocess_alive(self) -> None:
            from prometheus_client.multiprocess import mark_process_dead

            before = [p.pid for p in self.processes]
            super().keep_subprocess_alive()
            for pid, process in zip(before, self.processes, strict=True):
                if pid is not None and process.pid != pid:
                    mark_process_dead(pid)

    if config.workers == 1:
        server = uvicorn.Server(config)
        # bound before the app loads its model, as the supervisor binds for several workers: a port in use then
        # stops the start in a moment (uvicorn's one error line, exit 3), not after a warm-up of minutes
        listening = config.bind_socket()
        with contextlib.suppress(KeyboardInterrupt):
            server.run(sockets=[listening])
        failed = not server.started
    else:
        with _metrics_folder():
            supervisor = Supervisor(config, sockets=[config.bind_socket()])
            supervisor.run()
        failed = any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes)
    if failed:
        raise typer.Exit(STARTUP_FAILURE)


@contextlib.contextmanager
def _metrics_folder() -> Iterator[None]:
    """Several workers: prometheus-client's multiprocess mode, so that a scrape of any worker counts them all.
    A ``PROMETHEUS_MULTIPROC_DIR`` already set is used as it is (it must be a folder, emptied by whoever set
    it); otherwise a fresh temporary folder, removed when the server stops."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        if not Path(given).is_dir():
            raise typer.BadParameter(f"PROMETHEUS_MULTIPROC_DIR={given} is not a folder (prometheus-client needs one)")
        yield
        return
    with tempfile.TemporaryDirectory(prefix="vstar-metrics-") as folder:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder  # the workers, spawned after this, inherit it
        try:
            yield
        finally:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]


def register(app: typer.Typer, bench: typer.Typer) -> None:
    @app.command()
    def serve(
        checkpoint: CheckpointOpt,
        host: Annotated[str, typer.Option("--host", help="Interface to bind; 0.0.0.0 in a container.")] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port to listen on.")] = 8000,
        workers: Annotated[int, typer.Option("--workers", min=1, help="uvicorn worker processes.")] = 1,
    ) -> None:
        """Serve recommendations over HTTP (settings: VSTAR_* and REDIS_URL, see the README)."""
        import uvicorn
        from uvicorn.config import STARTUP_FAILURE

        from service.json_logs import configure_logging

        _require_checkpoint(checkpoint)
        problem = _listen_problem(host, port)
        if problem is not None:  # one line, with the exit status of a failed start (uvicorn's STARTUP_FAILURE)
            typer.echo(f"Error: {problem}", err=True)
            raise typer.Exit(STARTUP_FAILURE)
        os.environ["VSTAR_CHECKPOINT"] = str(checkpoint.resolve())
        settings = _settings()  # fail here, once, on a bad environment rather than in every worker
        if not settings.api_keys and not _is_loopback(host):
            typer.secho(
                f"warning: serving on {host} with open writes: anyone who reaches it can rewrite any user's "
                "history; set VSTAR_API_KEYS=key1,key2 (and VSTAR_REQUIRE_API_KEYS=true)",
                err=True,
                fg=typer.colors.YELLOW,
            )
        configure_logging(settings.log_level)  # the supervisor's own lines too, as JSON like the workers'
        if workers > 1 and settings.redis_url is None:
            logging.getLogger(__name__).warning(
                "--workers %d without REDIS_URL: each worker keeps its own user histories, idempotency keys and "
                "response cache, so a user's events reach one worker only and requests by user_id answered by the "
                "others do not see them; set REDIS_URL to share them",
                workers,
            )
        config = uvicorn.Config(
            "service.app:create_app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_config=None,
            access_log=False,
            log_level=settings.log_level.lower(),
        )
        _run(config)

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
                "leave history out).",
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
            typer.Option("--device", help="torch device [default: VSTAR_DEVICE, else cpu].", callback=_device),
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
        _require_checkpoint(checkpoint)
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
        settings = _settings(redis_url=None, **overrides)
        store = None
        if stored_history:  # the store vstar serve uses in this environment, read up front (service.batch_recommend)
            from service.app import build_store

            served = _settings(**overrides)
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
            Path | None, typer.Option("--json", help="Write the report here too.", callback=_output_file)
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
        settings = _settings()
        if settings.redis_url is None:
            raise UsageError(
                "vstar load-histories needs REDIS_URL (or VSTAR_REDIS_URL), the Redis vstar serve stores histories "
                "in: without it each server process keeps its own in memory, and this command's would be gone when "
                "it exits"
            )
        from service.app import build_store
        from service.load_histories import REDIS_TIMEOUT_S, Mode, read_timelines
        from service.load_histories import load_histories as load

        if settings.redis_timeout_s < REDIS_TIMEOUT_S:  # a request's bound, not a bulk write's (the module's doc)
            settings = _settings(redis_timeout_s=REDIS_TIMEOUT_S)

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
        if json_out is not None:
            result = report.to_json() | {"data": str(data), "splits": named, "mode": mode, "store": store.describe()}
            json_out.parent.mkdir(parents=True, exist_ok=True)
            write_file(json_out, (json.dumps(result, indent=2) + "\n").encode())

    @bench.command(name="serve")
    def bench_serve(
        checkpoint: CheckpointOpt,
        json_out: Annotated[
            Path | None, typer.Option("--json", help="Write the results here.", callback=_output_file)
        ] = None,
        clients: Annotated[
            str, typer.Option("--clients", help="Comma list of concurrent clients, a beam cell each.")
        ] = "1,8,32",
        caps: Annotated[str, typer.Option("--caps", help="Comma list of VED latency caps in ms.")] = "50,100,200",
        ved_clients: Annotated[
            str, typer.Option("--ved-clients", help="Comma list of concurrent clients of the VED cells.")
        ] = "1,8,32",
        mixed_ved_clients: Annotated[
            int,
            typer.Option(
                "--mixed-ved-clients",
                min=0,
                help="The mixed cell: one beam client beside this many VED clients at the largest cap (0: none).",
            ),
        ] = 2,
        k: Annotated[int, typer.Option("--k", min=1, max=100, help="Items per request.")] = 10,
        duration_s: Annotated[float, typer.Option("--duration-s", min=0.1, max=120, help="Seconds per cell.")] = 5.0,
        max_requests: Annotated[int, typer.Option("--max-requests", min=1, max=100_000, help="Per cell.")] = 3000,
        torch_threads: Annotated[int | None, typer.Option("--torch-threads", min=1, help="Server threads.")] = None,
    ) -> None:
        """p50/p99 latency and throughput of the real server: beam with and without batching, VED under caps."""
        from service.bench import BenchConfig, BenchCutShort
        from service.bench import bench_serve as run

        _require_checkpoint(checkpoint)  # its catalog is read next, by bench_serve, before a server starts
        caps_ms = _int_list(caps, "--caps")
        _caps_the_server_takes(caps_ms, k)
        config = BenchConfig(
            clients=_int_list(clients, "--clients"),
            caps_ms=caps_ms,
            ved_clients=_int_list(ved_clients, "--ved-clients"),
            mixed_ved_clients=mixed_ved_clients,
            k=k,
            duration_s=duration_s,
            max_requests=max_requests,
            torch_threads=torch_threads,
        )
        try:
            result = run(checkpoint, config)
        except BenchCutShort as e:  # the cells measured before the server stopped are kept, then its error
            cells = sum(len(rows) for rows in e.partial.values())
            _write_result(e.partial, json_out)
            kept = f"; the {cells} cells measured before it are " + (f"in {json_out}" if json_out else "above")
            raise ClickException(f"{e}{kept}") from None
        except RuntimeError as e:  # a server that did not start (a broken checkpoint): its error, one line
            raise ClickException(str(e)) from None
        _write_result(result, json_out)
