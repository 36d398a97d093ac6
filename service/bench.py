"""``vstar bench serve``: latency and throughput of the real server, measured from outside.

The server is started as a subprocess (``vstar serve``, ``service.serve_command``) on a free
loopback port, once with micro-batching and once without, and is driven by N
concurrent clients, each sending its next request as soon as the last
one is answered (closed loop). Per cell it records client-side latency (what a
caller sees: HTTP included, from the request's first byte written to the
response's last byte read), p50/p99, the same from the server's own
clock (``server_time_ms``: arrival to response built), throughput, and for VED the share
of answers that hit the cap, answered by the initial beam (the anytime
fallback) and answered from popularity (the hard cap). The reference measured in
the same run is the server without micro-batching: per client count, batching's
requests/s and p99 over those of the same clients without it
(``batching_vs_none``, printed too).

Decisions:

* the response cache is off (``VSTAR_CACHE_TTL_S=0``) and the stores are
  in-process: the benchmark measures the decode path, not Redis;
* histories are random catalog items (1-10 of them), fresh for every request, seeded per cell by its
  client count (and cap): the cells compared send the same ones (beam with and without batching, the
  mixed cell's beam client and the lone one); each cell starts with a few unrecorded warm-up requests per client;
* every cell is bounded by ``duration_s`` and ``max_requests``; every request by
  ``request_timeout_s``; the server start by ``startup_timeout_s``;
* loopback only: the server binds 127.0.0.1 and the clients talk to it alone;
* the clients are lean (``service.lean_client``): one keep-alive HTTP/1.1
  connection each, the response parsed by ``httptools``; a client library
  that spends a millisecond per response would time itself, not the service.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from service.lean_client import LeanClient
from service.serve_command import serve_command

HOST = "127.0.0.1"


@dataclass(frozen=True)
class BenchConfig:
    clients: tuple[int, ...] = (1, 8, 32)  # beam cells, with and without batching
    caps_ms: tuple[int, ...] = (50, 100, 200)  # VED cells
    ved_clients: tuple[int, ...] = (1, 8, 32)
    mixed_ved_clients: int = 2  # the mixed cell: one beam client beside this many VED clients (0: no such cell)
    k: int = 10
    duration_s: float = 5.0  # per cell
    max_requests: int = 3000  # per cell
    warmup_per_client: int = 2
    request_timeout_s: float = 30.0
    startup_timeout_s: float = 180.0
    torch_threads: int | None = None  # server's torch threads; None: torch's default
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.clients or min(self.clients) < 1 or (self.ved_clients and min(self.ved_clients) < 1):
            raise ValueError("client counts must be >= 1")
        if self.mixed_ved_clients < 0:
            raise ValueError("mixed_ved_clients must be >= 0")
        if self.caps_ms and min(self.caps_ms) < 1:
            raise ValueError("caps must be >= 1 ms")
        if self.duration_s <= 0 or self.max_requests < 1:
            raise ValueError("duration_s must be > 0 and max_requests >= 1")


@dataclass
class CellResult:
    latencies_ms: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)
    cap_hits: int = 0
    fallbacks: int = 0  # VED answers from the initial beam (the anytime fallback)
    popular: int = 0  # VED answers from the popularity list (the hard cap: no model answer in time)
    errors: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def summary(self) -> dict[str, float | None]:
        """The cell's figures; a percentile of no answered request is None (JSON null), not NaN (not JSON)."""

        def percentile(values: list[float], q: int) -> float | None:
            return round(float(np.percentile(values, q)), 2) if values else None

        n = len(self.latencies_ms)
        return {
            "p50_ms": percentile(self.latencies_ms, 50),
            "p99_ms": percentile(self.latencies_ms, 99),
            "rps": round(n / self.elapsed_s, 1) if self.elapsed_s else 0.0,
            # the server's own clock, arrival to response built (its server_time_ms): no HTTP, no client
            "server_p50_ms": percentile(self.server_ms, 50),
            "server_p99_ms": percentile(self.server_ms, 99),
            "errors": len(self.errors),  # answers other than 200 (on stderr, the first of them): not in the figures
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def item_ids_of(checkpoint: Path) -> list[int]:
    """The catalog's item ids, read from the checkpoint without loading the model; ``ValueError`` naming the file
    when it cannot give them (before any server is started)."""
    path = checkpoint / "catalog.json"
    if not path.is_file():
        raise ValueError(f"{checkpoint} is not a complete checkpoint: {path.name} is missing")
    try:
        items = json.loads(path.read_text())["items"]
        return sorted(int(i) for i in items)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} holds no catalog of items ({type(e).__name__}: {e})") from None


def history_source(item_ids: list[int], seed: str) -> Callable[[], list[int]]:
    """Random histories of 1-10 of ``item_ids``, the same ones for the same ``seed``."""
    rng = random.Random(seed)
    return lambda: [rng.choice(item_ids) for _ in range(rng.randint(1, 10))]


@contextmanager
def running_server(checkpoint: Path, batching: bool, config: BenchConfig) -> Iterator[str]:
    """Start ``vstar serve`` on a free loopback port; yield its base URL; stop it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "VSTAR_REDIS_URL")}
    env |= {
        "VSTAR_CACHE_TTL_S": "0",
        "VSTAR_BATCH_MAX_SIZE": "32" if batching else "1",
        "VSTAR_LOG_LEVEL": "WARNING",
        "VSTAR_ACCESS_LOG": "false",
        "PYTHONUNBUFFERED": "1",
    }
    if config.torch_threads is not None:
        env["VSTAR_TORCH_THREADS"] = str(config.torch_threads)
    cmd = serve_command(checkpoint, port, HOST)
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://{HOST}:{port}"
        try:
            wait_ready(url, proc, config.startup_timeout_s, log)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float, log: Any) -> None:
    """Poll ``/readyz`` until it answers 200; ``RuntimeError`` in one line when the server exits first (its first
    error, a broken checkpoint for instance) or is not ready in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            why = first_error(log.read().decode(errors="replace"))
            raise RuntimeError(f"the server exited with status {proc.returncode} before it was ready: {why}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not ready after {timeout_s:.0f} s")


def first_error(log: str) -> str:
    """The message of the server's first ERROR line (its log is JSON lines), else its last line."""
    lines = [line for line in log.splitlines() if line.strip()]
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("level") == "ERROR" and record.get("msg"):
            return str(record["msg"])
    return lines[-1].strip() if lines else "no output"


async def run_cell(url: str, make_body: Callable[[], dict[str, Any]], clients: int, config: BenchConfig) -> CellResult:
    """One closed-loop cell; each client has a connection of its own."""
    return (await run_cells(url, [(make_body, clients)], config))[0]


async def run_cells(
    url: str, groups: list[tuple[Callable[[], dict[str, Any]], int]], config: BenchConfig
) -> list[CellResult]:
    """Closed-loop groups of clients at once (the mixed cell: beam and VED), one result each; every group has
    the cell's duration and its own ``max_requests``."""
    results = [CellResult() for _ in groups]
    https = [[LeanClient(url, config.request_timeout_s) for _ in range(clients)] for _, clients in groups]
    try:

        async def warm(http: LeanClient, make_body: Callable[[], dict[str, Any]]) -> None:
            for _ in range(config.warmup_per_client):
                await http.post("/recommend", make_body())

        await asyncio.gather(*(warm(h, body) for (body, _), hs in zip(groups, https, strict=True) for h in hs))
        issued = [0] * len(groups)
        stop_at = time.perf_counter() + config.duration_s

        async def client(http: LeanClient, g: int) -> None:
            make_body, result = groups[g][0], results[g]
            while time.perf_counter() < stop_at and issued[g] < config.max_requests:
                issued[g] += 1
                status, raw, seconds = await http.post("/recommend", make_body())
                if status != 200:
                    result.errors.append(f"{status} {raw[:200].decode(errors='replace')}")
                    continue
                body = json.loads(raw)
                result.latencies_ms.append(seconds * 1000)
                result.server_ms.append(body["server_time_ms"])
                result.cap_hits += bool(body["cap_hit"])
                fallback = body["search"] and body["search"]["fallback"]
                result.fallbacks += fallback == "initial_beam"
                result.popular += fallback == "popular"

        t0 = time.perf_counter()
        await asyncio.gather(*(client(h, g) for g, hs in enumerate(https) for h in hs))
        for result in results:
            result.elapsed_s = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(h.aclose() for hs in https for h in hs))
    return results


def log_cell(label: str, cell: CellResult, summary: dict[str, Any]) -> None:
    def ms(key: str, spec: str) -> str:
        return "-" if summary[key] is None else format(summary[key], spec)

    print(
        f"{label:<34} n={len(cell.latencies_ms):>5} p50={ms('p50_ms', '>8.2f')} ms p99={ms('p99_ms', '>8.2f')} ms "
        f"rps={summary['rps']:>7.1f}  server p50/p99={ms('server_p50_ms', '.1f')}/{ms('server_p99_ms', '.1f')} ms"
        + (f"  ERRORS={len(cell.errors)} first: {cell.errors[0]}" if cell.errors else ""),
        file=sys.stderr,
        flush=True,
    )


class BenchCutShort(RuntimeError):
    """The server stopped answering during a cell; ``partial`` holds the cells measured before it."""

    def __init__(self, message: str, partial: dict[str, list[dict[str, Any]]]) -> None:
        super().__init__(message)
        self.partial = partial


def bench_serve(checkpoint: Path, config: BenchConfig) -> dict[str, list[dict[str, Any]]]:
    """Run every cell; returns ``{"beam": [...], "ved": [...]}`` in the issue's shape, ``batching_vs_none``
    (``batching_ratios``) and, with VED caps and ``mixed_ved_clients``, ``mixed``: one beam client beside VED
    ones at the largest cap, its latency over one beam client's alone. A server that stops answering mid-run
    raises ``BenchCutShort`` with the cells measured so far."""
    item_ids = item_ids_of(checkpoint)
    out: dict[str, list[dict[str, Any]]] = {"beam": [], "ved": []}

    def measure(label: str, url: str, body: Callable[[], dict[str, Any]], clients: int) -> CellResult:
        try:
            return asyncio.run(run_cell(url, body, clients, config))
        except (OSError, EOFError) as e:  # refused, reset or cut-short connections; timeouts (an OSError too)
            raise BenchCutShort(f"{label}: the server stopped answering ({type(e).__name__}: {e})", out) from None

    def beam_body(clients: int) -> Callable[[], dict[str, Any]]:
        history = history_source(item_ids, f"{config.seed}:beam:{clients}")
        return lambda: {"history": history(), "k": config.k}

    def ved_body(cap: int, clients: int) -> Callable[[], dict[str, Any]]:
        history = history_source(item_ids, f"{config.seed}:ved:{cap}:{clients}")
        return lambda: {"history": history(), "k": config.k, "mode": "ved", "latency_ms": cap}

    def mixed_cell(url: str, cap: int) -> dict[str, Any]:
        """One beam client beside ``mixed_ved_clients`` VED ones at ``cap``; the beam figures over those of one
        beam client alone on the same server (this run's ``beam clients=1 batching=True`` cell)."""
        label = f"mixed: beam clients=1 + ved cap={cap} ms clients={config.mixed_ved_clients}"
        groups = [(beam_body(1), 1), (ved_body(cap, config.mixed_ved_clients), config.mixed_ved_clients)]
        try:
            beam, ved = asyncio.run(run_cells(url, groups, config))
        except (OSError, EOFError) as e:
            raise BenchCutShort(f"{label}: the server stopped answering ({type(e).__name__}: {e})", out) from None
        rows = {"beam": beam.summary(), "ved": ved_summary(ved)}
        for kind, cell in (("beam", beam), ("ved", ved)):
            log_cell(f"mixed {kind}", cell, rows[kind])
            refused(f"{label} ({kind})", cell, out)
        alone = next((r for r in out["beam"] if r["clients"] == 1 and r["batching"]), {})
        return {
            "cap_ms": cap,
            "ved_clients": config.mixed_ved_clients,
            **rows,
            "beam_p50_vs_alone": ratio(rows["beam"]["p50_ms"], alone.get("p50_ms")),
            "beam_p99_vs_alone": ratio(rows["beam"]["p99_ms"], alone.get("p99_ms")),
        }

    def serve_cells(batching: bool) -> None:
        with running_server(checkpoint, batching, config) as url:
            for clients in config.clients:
                label = f"beam clients={clients} batching={batching}"
                cell = measure(label, url, beam_body(clients), clients)
                row = {"clients": clients, "batching": batching, **cell.summary()}
                log_cell(label, cell, row)
                refused(label, cell, out)  # before the row: a row of nulls is no measurement to keep
                out["beam"].append(row)
            if not batching:
                return
            for cap in config.caps_ms:
                for clients in config.ved_clients:
                    label = f"ved cap={cap} ms clients={clients}"
                    cell = measure(label, url, ved_body(cap, clients), clients)
                    row = {"cap_ms": cap, "clients": clients, **ved_summary(cell)}
                    log_cell(label, cell, row)
                    refused(label, cell, out)
                    out["ved"].append(row)
            if config.mixed_ved_clients and config.caps_ms:
                out["mixed"] = [mixed_cell(url, max(config.caps_ms))]
                log_mixed(out["mixed"][0])

    try:
        for batching in (True, False):
            serve_cells(batching)
    except BenchCutShort:
        out["batching_vs_none"] = batching_ratios(out["beam"])  # the client counts measured both ways so far
        raise
    except RuntimeError as e:  # the server without batching did not start: the first one's cells are kept
        if not out["beam"]:
            raise  # the first did not start (a broken checkpoint): nothing was measured
        out["batching_vs_none"] = []
        raise BenchCutShort(f"batching=False: {e}", out) from None
    out["batching_vs_none"] = batching_ratios(out["beam"])
    for row in out["batching_vs_none"]:
        log_ratio(row)
    return out


def ved_summary(cell: CellResult) -> dict[str, Any]:
    """A VED cell's figures and the shares of its answered requests that hit the cap, came from the initial beam
    and from popularity (None: none was answered)."""
    n = len(cell.latencies_ms)

    def share(count: int) -> float | None:
        return round(count / n, 3) if n else None

    return {
        **cell.summary(),
        "cap_hit_share": share(cell.cap_hits),
        "fallback_share": share(cell.fallbacks),
        "popular_share": share(cell.popular),
    }


def ratio(on: float | None, off: float | None) -> float | None:
    """``on / off`` to two decimals; None where a side has no figure (or ``off`` is 0)."""
    return round(on / off, 2) if on is not None and off else None


def times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def log_mixed(row: dict[str, Any]) -> None:
    print(
        f"mixed: one beam client beside {row['ved_clients']} VED clients at cap {row['cap_ms']} ms / beam alone: "
        f"p50 {times(row['beam_p50_vs_alone'])}, p99 {times(row['beam_p99_vs_alone'])}",
        file=sys.stderr,
        flush=True,
    )


def batching_ratios(beam: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per client count measured both ways, the batching server's figures over those of the server without it:
    ``rps_ratio`` above 1 and ``p99_ratio`` below 1 are batching's gain; None where a side has no figure."""
    rows = {(row["clients"], row["batching"]): row for row in beam}
    out = []
    for clients in dict.fromkeys(row["clients"] for row in beam):  # in the order measured
        on, off = rows.get((clients, True)), rows.get((clients, False))
        if on is not None and off is not None:
            out.append(
                {
                    "clients": clients,
                    "rps_ratio": ratio(on["rps"], off["rps"]),
                    "p99_ratio": ratio(on["p99_ms"], off["p99_ms"]),
                }
            )
    return out


def log_ratio(row: dict[str, Any]) -> None:
    print(
        f"beam clients={row['clients']}: batching / no batching: requests/s {times(row['rps_ratio'])}, "
        f"p99 {times(row['p99_ratio'])}",
        file=sys.stderr,
        flush=True,
    )


def refused(label: str, cell: CellResult, out: dict[str, list[dict[str, Any]]]) -> None:
    """``BenchCutShort`` when the server answered none of the cell's requests: a row of nulls is no measurement."""
    if cell.errors and not cell.latencies_ms:
        raise BenchCutShort(f"{label}: the server refused all {len(cell.errors)} requests ({cell.errors[0]})", out)
