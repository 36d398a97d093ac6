"""``vstar serve`` and ``vstar bench serve`` (registered on the root command by ``vstar.py``).

``serve`` hands the checkpoint to the app through ``VSTAR_CHECKPOINT``, so every
uvicorn worker process builds its app from the same environment
(``service.app:create_app_from_env``); every other setting is read there too
(``service.settings``). The offline commands, ``recommend`` and ``load-histories``, are
``service.offline_cli``'s; what the two modules share is ``service.cli_options``'s.
Heavy imports stay inside the handlers.
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
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer._click.exceptions import ClickException  # typer vendors click from 0.28 on

from models.atomic_folder import write_file
from service.cli_options import CheckpointOpt, output_file_callback, require_checkpoint, settings_from_env

if TYPE_CHECKING:
    import uvicorn


def _int_list(text: str, name: str) -> tuple[int, ...]:
    """``text`` as a comma list of positive integers (client counts, caps in ms), or a one-line error naming the
    option ``name``, as ``training.cli.options.int_list`` words it."""
    if not text.strip():
        raise typer.BadParameter("empty list", param_hint=name)
    parts = text.split(",")
    empty = next((i for i, v in enumerate(parts, 1) if not v.strip()), None)
    if empty is not None:
        raise typer.BadParameter(f"entry {empty} of {text!r} is empty", param_hint=name)
    try:
        values = tuple(int(v) for v in parts)
    except ValueError:
        values = (0,)
    if any(v < 1 for v in values):
        raise typer.BadParameter(f"expected a comma list of positive integers, got {text!r}", param_hint=name)
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

        require_checkpoint(checkpoint)
        problem = _listen_problem(host, port)
        if problem is not None:  # one line, with the exit status of a failed start (uvicorn's STARTUP_FAILURE)
            typer.echo(f"Error: {problem}", err=True)
            raise typer.Exit(STARTUP_FAILURE)
        os.environ["VSTAR_CHECKPOINT"] = str(checkpoint.resolve())
        settings = settings_from_env()  # fail here, once, on a bad environment rather than in every worker
        configure_logging(settings.log_level)  # the supervisor's own lines too, as JSON like the workers'
        if not settings.api_keys and not _is_loopback(host):
            logging.getLogger(__name__).warning(
                "serving on %s with open writes: anyone who reaches it can rewrite any user's history; set "
                "VSTAR_API_KEYS=key1,key2 (and VSTAR_REQUIRE_API_KEYS=true)",
                host,
            )
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

    @bench.command(name="serve")
    def bench_serve(
        checkpoint: CheckpointOpt,
        json_out: Annotated[
            Path | None, typer.Option("--json", help="Write the results here.", callback=output_file_callback)
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

        caps_ms = _int_list(caps, "--caps")
        _caps_the_server_takes(caps_ms, k)
        beam_clients, ved_counts = _int_list(clients, "--clients"), _int_list(ved_clients, "--ved-clients")
        require_checkpoint(checkpoint)  # its catalog is read next, by bench_serve, before a server starts
        config = BenchConfig(
            clients=beam_clients,
            caps_ms=caps_ms,
            ved_clients=ved_counts,
            mixed_ved_clients=mixed_ved_clients,
            k=k,
            duration_s=duration_s,
            max_requests=max_requests,
            torch_threads=torch_threads,
        )
        try:
            result = run(checkpoint, config)
        except BenchCutShort as e:  # the cells measured before the server stopped are kept, then its error
            cells = sum(len(rows) for name, rows in e.partial.items() if name != "batching_vs_none")
            _write_result(e.partial, json_out)
            kept = f"; the {cells} cells measured before it are " + (f"in {json_out}" if json_out else "above")
            raise ClickException(f"{e}{kept}") from None
        except RuntimeError as e:  # a server that did not start (a broken checkpoint): its error, one line
            raise ClickException(str(e)) from None
        _write_result(result, json_out)
