"""``vstar serve`` and ``vstar bench serve``: the real server in a subprocess, measured in the issue's shape."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from service.bench import BenchConfig, bench_serve, running_server
from service.cli import _write_result
from service.deadline import DeadlineMargin
from service.lean_client import LeanClient
from tests.service.conftest import free_port
from vstar import app

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.usefixtures("disk_fills_up")
def test_a_bench_result_cut_short_leaves_the_earlier_one_whole(tmp_path: Path) -> None:
    """``vstar bench serve --json`` onto an earlier result: a write that fails half way (a full disk) leaves the
    earlier file as it was; the rows are on stdout all the same."""
    report = tmp_path / "bench.json"
    with open(report, "wb") as f:  # builtins.open: written before the disk filled
        f.write(b'{"beam": []}\n')
    with pytest.raises(OSError, match="No space left"):
        _write_result({"beam": [{"clients": 1, "p50_ms": 3.0}]}, report)
    assert json.loads(report.read_text()) == {"beam": []}
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]


@pytest.mark.parametrize(
    ("flag", "value"), [("--clients", "0"), ("--ved-clients", "8,-1"), ("--caps", "0,100"), ("--clients", "1,x")]
)
def test_a_bad_list_of_bench_serve_names_its_option(flag: str, value: str, tmp_path: Path) -> None:
    """--clients 0 and --ved-clients 0 both said "client counts must be >= 1", naming neither option; each list
    is now refused as vstar bench decode's are, naming the option, before a server starts."""
    (tmp_path / "manifest.json").write_text("{}")
    result = CliRunner().invoke(app, ["bench", "serve", "--checkpoint", str(tmp_path), flag, value])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for {flag}: expected a comma list of positive integers, got '{value}'" in result.output


@pytest.mark.parametrize("host", ["127.0.0.1", "no-such-host.invalid", "192.0.2.1"])
def test_serve_names_the_address_it_cannot_listen_on(
    host: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn's own error named neither host nor port ("[Errno 98] Address already in use", "[Errno -2] Name or
    service not known"), as a JSON log line; now one line names both, with the exit status of a failed start
    (3), before the settings are read or the model loads. 192.0.2.1 (TEST-NET-1) is no address of this machine."""
    import socket

    monkeypatch.delenv("VSTAR_CHECKPOINT", raising=False)  # an earlier serve in this process may have set it
    (tmp_path / "manifest.json").write_text("{}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]  # in use on 127.0.0.1; on the other hosts, the bind fails before the port
        result = CliRunner().invoke(app, ["serve", "--checkpoint", str(tmp_path), "--host", host, "--port", str(port)])
    assert result.exit_code == 3, result.output
    assert result.output.startswith(f"Error: cannot listen on {host}:{port}: ") and result.output.count("\n") == 1
    assert "VSTAR_CHECKPOINT" not in os.environ  # refused before the server's environment is set


def test_serve_rejects_a_folder_that_is_no_checkpoint(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["serve", "--checkpoint", str(tmp_path)])
    assert result.exit_code != 0 and "not a checkpoint folder" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_a_failed_start_exits_non_zero_with_any_number_of_workers(
    tiny_checkpoint: Path, tmp_path: Path, workers: int
) -> None:
    """A worker that cannot load the model stops the start with exit 3 (uvicorn's STARTUP_FAILURE): with several
    workers uvicorn.run returned normally after stopping them, so a supervisor saw a clean exit."""
    broken = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    command = [sys.executable, "vstar.py", "serve", "--checkpoint", str(broken), "--workers", str(workers)]
    env = os.environ | {"VSTAR_WARMUP": "false", "OMP_NUM_THREADS": "1"}
    env.pop("REDIS_URL", None)
    done = subprocess.run(
        [*command, "--port", str(free_port())], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert "model.safetensors" in done.stderr
    lines = done.stderr.strip().splitlines()
    assert all(json.loads(line)["ts"] for line in lines), lines  # the supervisor's lines are JSON like the workers'


def _metric_samples(text: str, name: str) -> list[tuple[str, float]]:
    """(labels, value) of every sample of ``name`` in a Prometheus text exposition."""
    out = []
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in "{ ":
            labels, value = line[len(name) :].rsplit(" ", 1)
            out.append((labels.strip(), float(value)))
    return out


@pytest.mark.slow
def test_several_workers_answer_a_scrape_with_all_their_metrics(tiny_checkpoint: Path) -> None:
    """With --workers 2 every scrape counts the requests of both workers (each kept its own registry, so a scrape
    saw only the worker that answered it), each live worker has its own gauge sample, and the metrics folder
    vstar made is gone once the server stops."""
    port = free_port()
    env = os.environ | {"VSTAR_WARMUP": "false", "OMP_NUM_THREADS": "1", "VSTAR_TORCH_THREADS": "1"}
    env.pop("REDIS_URL", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    folders_before = set(Path(tempfile.gettempdir()).glob("vstar-metrics-*"))
    command = [sys.executable, "vstar.py", "serve", "--checkpoint", str(tiny_checkpoint), "--workers", "2"]
    server = subprocess.Popen([*command, "--port", str(port)], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    assert server.stderr is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(server.stderr or ()), daemon=True)  # the JSON log
    reader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # both workers serving: a worker still starting accepts nothing
        while sum("Application startup complete" in line for line in lines) < 2:
            assert time.monotonic() < deadline and server.poll() is None, "".join(lines)[-2000:]
            time.sleep(0.1)
        n = 24
        for i in range(n):  # a new connection each: the kernel hands them to either worker
            r = httpx.post(f"{url}/recommend", json={"history": [i % 5 + 1], "k": 3}, timeout=30)
            assert r.status_code == 200, r.text
        for _ in range(6):
            text = httpx.get(f"{url}/metrics", timeout=10).text
            counted = sum(v for _, v in _metric_samples(text, "vstar_recommend_requests_total"))
            assert counted == n, text
            pids = {labels for labels, _ in _metric_samples(text, "vstar_ved_deadline_margin_seconds")}
            assert len(pids) == 2 and all('pid="' in labels for labels in pids), pids
    finally:
        server.terminate()
        server.wait(timeout=60)
        reader.join(timeout=10)
    left = set(Path(tempfile.gettempdir()).glob("vstar-metrics-*")) - folders_before
    assert not left, f"the metrics folder outlived the server: {left}"


def test_several_workers_refuse_a_metrics_folder_that_is_not_one(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    not_a_folder = tmp_path / "metrics"
    not_a_folder.write_text("")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(not_a_folder))
    monkeypatch.delenv("REDIS_URL", raising=False)
    args = ["serve", "--checkpoint", str(tiny_checkpoint), "--workers", "2", "--port", str(free_port())]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and f"PROMETHEUS_MULTIPROC_DIR={not_a_folder} is not a folder" in result.output


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"VSTAR_MAX_K": "many"}, "bad VSTAR_* settings in the environment: VSTAR_MAX_K: Input should be a valid"),
        ({"VSTAR_DEFAULT_K": "200"}, "environment: VSTAR_DEFAULT_K=200 exceeds VSTAR_MAX_K=100"),
        (
            {"REDIS_URL": "redis://h:1/x"},
            "REDIS_URL (or VSTAR_REDIS_URL): the database in the Redis URL must be a number",
        ),
        # 100,000 threads failed the start with a traceback, 5,000 never finished the warm-up
        ({"VSTAR_TORCH_THREADS": "100000"}, "VSTAR_TORCH_THREADS: 100000 threads, more than the"),
    ],
)
def test_serve_names_a_bad_setting_by_its_environment_variable(
    tiny_checkpoint: Path, env: dict[str, str], message: str
) -> None:
    result = CliRunner().invoke(app, ["serve", "--checkpoint", str(tiny_checkpoint)], env=env)
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


@pytest.mark.parametrize(("workers", "redis", "warned"), [(2, False, True), (2, True, False), (1, False, False)])
def test_several_workers_without_redis_are_warned_that_histories_are_per_worker(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, workers: int, redis: bool, warned: bool
) -> None:
    import service.cli

    monkeypatch.setattr(service.cli, "_run", lambda config: None)  # the checks and warnings, no server
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("VSTAR_REDIS_URL", raising=False)
    env = {"REDIS_URL": "redis://127.0.0.1:6379/0"} if redis else {}
    args = ["serve", "--checkpoint", str(tiny_checkpoint), "--workers", str(workers)]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert ("each worker keeps its own user histories" in said) is warned, said


def test_open_writes_on_another_host_are_warned_in_a_json_line(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The warning came before the logs were set up, as plain text among the JSON lines a log shipper parses."""
    import service.cli

    monkeypatch.setattr(service.cli, "_run", lambda config: None)  # the checks and warnings, no server
    monkeypatch.delenv("VSTAR_API_KEYS", raising=False)
    result = CliRunner().invoke(app, ["serve", "--checkpoint", str(tiny_checkpoint), "--host", "0.0.0.0"])
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.output.splitlines() if "open writes" in line]
    record = json.loads(line)
    assert record["level"] == "WARNING" and record["msg"].startswith("serving on 0.0.0.0 with open writes")


def test_a_bench_cell_without_an_answered_request_has_null_percentiles() -> None:
    """NaN there made the --json file invalid JSON; the log line prints '-' for them."""
    from service.bench import CellResult, log_cell

    cell = CellResult(errors=["503 ..."], elapsed_s=1.0)
    summary = cell.summary()
    assert summary == {
        "p50_ms": None, "p99_ms": None, "rps": 0.0, "server_p50_ms": None, "server_p99_ms": None, "errors": 1
    }  # fmt: skip
    json.dumps(summary, allow_nan=False)
    log_cell("beam clients=1", cell, summary)  # formats without a number


def cells_failing_at(failing: int) -> Callable[..., Awaitable[Any]]:
    """A stand-in for ``service.bench.run_cell``: each cell answers two requests, and the one at index
    ``failing`` (counted from 0) finds the server gone."""
    from service.bench import CellResult

    calls = itertools.count()

    async def cell(url: str, body: object, clients: int, config: BenchConfig) -> CellResult:
        if next(calls) == failing:
            raise ConnectionResetError(104, "Connection reset by peer")
        return CellResult(latencies_ms=[1.0, 2.0], server_ms=[0.5, 0.6], elapsed_s=1.0)

    return cell


def test_bench_serve_keeps_the_cells_measured_before_the_server_stopped(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Minutes of cells were lost with a traceback when the server died mid-run; now they are written, then one
    line says which cell it stopped in."""
    import contextlib

    import service.bench

    monkeypatch.setattr(service.bench, "run_cell", cells_failing_at(1))
    monkeypatch.setattr(service.bench, "running_server", lambda *a: contextlib.nullcontext("http://x"))
    out = tmp_path / "bench.json"
    command = ["bench", "serve", "--checkpoint", str(tiny_checkpoint), "--json", str(out), "--clients", "1,8"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 1, result.output
    assert "Error: beam clients=8 batching=True: the server stopped answering (ConnectionResetError" in result.output
    assert f"the 1 cells measured before it are in {out}" in " ".join(result.output.split())
    kept = json.loads(out.read_text())
    assert kept == {"beam": [{"clients": 1, "batching": True, "p50_ms": 1.5, "p99_ms": 1.99, "rps": 2.0,
                              "server_p50_ms": 0.55, "server_p99_ms": 0.6, "errors": 0}], "ved": [],
                    "batching_vs_none": []}  # fmt: skip


def test_a_bench_cut_short_keeps_the_ratios_of_the_client_counts_measured_both_ways(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import contextlib

    import service.bench

    # beam 1 and 8 and VED with batching, beam 1 without, then the server stops
    monkeypatch.setattr(service.bench, "run_cell", cells_failing_at(4))
    monkeypatch.setattr(service.bench, "running_server", lambda *a: contextlib.nullcontext("http://x"))
    out = tmp_path / "bench.json"
    command = ["bench", "serve", "--checkpoint", str(tiny_checkpoint), "--json", str(out), "--clients", "1,8"]
    result = CliRunner().invoke(app, [*command, "--caps", "100", "--ved-clients", "1", "--mixed-ved-clients", "0"])
    assert result.exit_code == 1 and "beam clients=8 batching=False" in result.output, result.output
    assert json.loads(out.read_text())["batching_vs_none"] == [{"clients": 1, "rps_ratio": 1.0, "p99_ratio": 1.0}]


def test_bench_serve_keeps_the_first_servers_cells_when_the_second_does_not_start(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server without batching starts after every batching cell (beam, VED, mixed) was measured; one that
    did not start (killed, or past its start-up timeout) threw them all away."""
    import contextlib

    import service.bench

    @contextlib.contextmanager
    def server(checkpoint: Path, batching: bool, config: BenchConfig) -> Iterator[str]:
        if not batching:
            raise RuntimeError("the server exited with status -9 before it was ready: no output")
        yield "http://x"

    monkeypatch.setattr(service.bench, "run_cell", cells_failing_at(-1))  # never
    monkeypatch.setattr(service.bench, "running_server", server)
    out = tmp_path / "bench.json"
    command = ["bench", "serve", "--checkpoint", str(tiny_checkpoint), "--json", str(out), "--clients", "1,8"]
    result = CliRunner().invoke(app, [*command, "--caps", "100", "--ved-clients", "1", "--mixed-ved-clients", "0"])
    assert result.exit_code == 1, result.output
    said = " ".join(result.output.split())
    assert "Error: batching=False: the server exited with status -9 before it was ready" in said
    assert f"the 3 cells measured before it are in {out}" in said
    kept = json.loads(out.read_text())
    assert [r["clients"] for r in kept["beam"]] == [1, 8] and len(kept["ved"]) == 1 and kept["batching_vs_none"] == []


def test_a_cell_the_server_refused_whole_is_not_written_among_the_cells_measured(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refused cell's row of nulls was appended before the bench stopped: written to --json and counted among
    "the cells measured before it"."""
    import contextlib

    import service.bench
    from service.bench import CellResult

    answered = iter([True, False])

    async def cell(url: str, body: object, clients: int, config: BenchConfig) -> CellResult:
        if next(answered):
            return CellResult(latencies_ms=[1.0, 2.0], server_ms=[0.5, 0.6], elapsed_s=1.0)
        return CellResult(errors=["422 k"], elapsed_s=1.0)

    monkeypatch.setattr(service.bench, "run_cell", cell)
    monkeypatch.setattr(service.bench, "running_server", lambda *a: contextlib.nullcontext("http://x"))
    out = tmp_path / "bench.json"
    command = ["bench", "serve", "--checkpoint", str(tiny_checkpoint), "--json", str(out), "--clients", "1,8"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 1 and "the server refused all 1 requests" in result.output, result.output
    assert f"the 1 cells measured before it are in {out}" in " ".join(result.output.split())
    assert [row["clients"] for row in json.loads(out.read_text())["beam"]] == [1]


def test_bench_serve_prints_batching_against_the_server_without_it_measured_in_the_same_run(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every other bench prints its ratio to a reference; this one printed rows alone, and the README's 9.7x and
    2.1x were worked out by hand. Batching: 1 client at 40 requests/s, p99 20 ms; 8 at 160, 50 ms. Without it:
    50 and 16 ms; 40 and 200 ms."""
    import contextlib

    import service.bench
    from service.bench import CellResult

    figures = iter([(1, 40, 20.0), (8, 160, 50.0), (1, 50, 16.0), (8, 40, 200.0)])  # beam cells, in order

    async def cell(url: str, body: Callable[[], dict[str, Any]], clients: int, config: BenchConfig) -> CellResult:
        if "mode" in body():
            return CellResult(latencies_ms=[30.0], server_ms=[29.0], elapsed_s=1.0)
        expected, n, p99 = next(figures)
        assert clients == expected
        return CellResult(latencies_ms=[p99] * n, server_ms=[p99] * n, elapsed_s=1.0)

    async def cells(url: str, groups: list[tuple[Callable[[], dict[str, Any]], int]], config: BenchConfig) -> Any:
        assert [clients for _, clients in groups] == [1, 3] and "mode" not in groups[0][0]()
        assert groups[1][0]()["mode"] == "ved" and groups[1][0]()["latency_ms"] == 200
        return [CellResult(latencies_ms=[24.0, 40.0], server_ms=[1.0, 1.0], elapsed_s=1.0), CellResult([80.0], [79.0])]

    monkeypatch.setattr(service.bench, "run_cell", cell)
    monkeypatch.setattr(service.bench, "run_cells", cells)
    monkeypatch.setattr(service.bench, "running_server", lambda *a: contextlib.nullcontext("http://x"))
    out = tmp_path / "bench.json"
    args = ["--clients", "1,8", "--caps", "50,200", "--ved-clients", "1", "--mixed-ved-clients", "3"]
    args += ["--json", str(out)]
    result = CliRunner().invoke(app, ["bench", "serve", "--checkpoint", str(tiny_checkpoint), *args])
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert written["batching_vs_none"] == [
        {"clients": 1, "rps_ratio": 0.8, "p99_ratio": 1.25},
        {"clients": 8, "rps_ratio": 4.0, "p99_ratio": 0.25},
    ]
    assert "beam clients=8: batching / no batching: requests/s 4.00x, p99 0.25x" in result.output
    # the mixed cell: beam p50 32 ms and p99 39.84 ms beside VED, against 20 ms alone (one beam client, batching)
    (mixed,) = written["mixed"]
    assert (mixed["cap_ms"], mixed["ved_clients"], mixed["beam"]["p50_ms"], mixed["ved"]["p50_ms"]) == (200, 3, 32, 80)
    assert (mixed["beam_p50_vs_alone"], mixed["beam_p99_vs_alone"]) == (1.6, 1.99)
    assert "one beam client beside 3 VED clients at cap 200 ms / beam alone: p50 1.60x, p99 1.99x" in result.output


def test_bench_serve_sends_the_same_histories_to_the_cells_it_compares(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One random stream ran through every cell: the server without batching was measured on other histories
    than the one with it, and the mixed cell's beam client on others than the lone beam client."""
    import contextlib

    import service.bench
    from service.bench import CellResult

    sent: list[list[list[int]]] = []  # per cell in the order run: the first histories its (beam) requests carry

    async def cell(url: str, body: Callable[[], dict[str, Any]], clients: int, config: BenchConfig) -> CellResult:
        sent.append([body()["history"] for _ in range(20)])
        return CellResult(latencies_ms=[1.0], server_ms=[1.0], elapsed_s=1.0)

    async def cells(url: str, groups: list[tuple[Callable[[], dict[str, Any]], int]], config: BenchConfig) -> Any:
        sent.append([groups[0][0]()["history"] for _ in range(20)])
        return [CellResult(latencies_ms=[1.0], server_ms=[1.0], elapsed_s=1.0) for _ in groups]

    monkeypatch.setattr(service.bench, "run_cell", cell)
    monkeypatch.setattr(service.bench, "run_cells", cells)
    monkeypatch.setattr(service.bench, "running_server", lambda *a: contextlib.nullcontext("http://x"))
    bench_serve(tiny_checkpoint, BenchConfig(clients=(1, 8), caps_ms=(50,), ved_clients=(1,), mixed_ved_clients=1))
    beam1, beam8, _, mixed, beam1_unbatched, beam8_unbatched = sent
    assert beam1 == beam1_unbatched == mixed and beam8 == beam8_unbatched


def test_batching_ratios_of_a_cell_without_answers_are_null() -> None:
    from service.bench import batching_ratios

    rows = [
        {"clients": 1, "batching": True, "rps": 10.0, "p99_ms": None},
        {"clients": 1, "batching": False, "rps": 0.0, "p99_ms": None},
        {"clients": 4, "batching": True, "rps": 10.0, "p99_ms": 5.0},  # not measured without batching
    ]
    assert batching_ratios(rows) == [{"clients": 1, "rps_ratio": None, "p99_ratio": None}]
    json.dumps(batching_ratios(rows), allow_nan=False)


def test_bench_serve_refuses_a_json_path_that_cannot_take_the_file_before_it_runs(tmp_path: Path) -> None:
    """Checked as the options are read: the benchmark takes minutes, its result must not be lost at the end."""
    (tmp_path / "a_file").write_text("mine")
    for json_out, message in [
        (tmp_path, "is a folder: give the path of a file to write"),
        (tmp_path / "a_file" / "out.json", "is a file, so"),
    ]:
        result = CliRunner().invoke(app, ["bench", "serve", "--checkpoint", str(tmp_path), "--json", str(json_out)])
        assert result.exit_code == 2 and message in result.output, result.output
    assert (tmp_path / "a_file").read_text() == "mine"


def one_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in output, output[-3000:]
    return lines[0]


def test_bench_serve_names_a_folder_that_is_no_checkpoint_before_a_server_starts(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """It raised FileNotFoundError on catalog.json, a traceback."""
    result = CliRunner().invoke(app, ["bench", "serve", "--checkpoint", str(tmp_path / "gone")])
    assert result.exit_code == 2 and "gone is not a checkpoint folder (no manifest.json)" in one_line(result.output)
    broken = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (broken / "catalog.json").write_text("[1, 2")
    result = CliRunner().invoke(app, ["bench", "serve", "--checkpoint", str(broken)])
    assert result.exit_code == 2 and "catalog.json holds no catalog of items" in one_line(result.output)


def test_bench_serve_names_why_the_server_did_not_start_in_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The server's log went up in a RuntimeError with a traceback; its first error is the line."""
    broken = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (broken / "config.json").unlink()
    args = ["bench", "serve", "--checkpoint", str(broken), "--clients", "1", "--caps", "50", "--ved-clients", "1"]
    result = CliRunner().invoke(app, args, env={"VSTAR_WARMUP": "false"})
    line = one_line(result.output)
    assert result.exit_code == 1 and "the server exited with status 3 before it was ready" in line, line
    assert "config.json is missing" in line


def test_bench_serve_reports_the_issue_shape(tiny_checkpoint: Path) -> None:
    config = BenchConfig(
        clients=(1, 3),
        caps_ms=(50,),
        ved_clients=(2,),
        duration_s=0.3,
        max_requests=30,
        warmup_per_client=1,
        torch_threads=1,
    )
    out = bench_serve(tiny_checkpoint, config)
    assert [(r["clients"], r["batching"]) for r in out["beam"]] == [(1, True), (3, True), (1, False), (3, False)]
    assert [r["clients"] for r in out["batching_vs_none"]] == [1, 3]
    assert all(r["rps_ratio"] > 0 and r["p99_ratio"] > 0 for r in out["batching_vs_none"])
    for row in out["beam"]:
        assert set(row) == {
            "clients", "batching", "p50_ms", "p99_ms", "rps", "server_p50_ms", "server_p99_ms", "errors"
        }  # fmt: skip
        assert 0 < row["p50_ms"] <= row["p99_ms"] and row["rps"] > 0 and row["errors"] == 0
    (ved,) = out["ved"]
    assert set(ved) == {
        "cap_ms",
        "clients",
        "p50_ms",
        "p99_ms",
        "rps",
        "server_p50_ms",
        "server_p99_ms",
        "errors",
        "cap_hit_share",
        "fallback_share",
        "popular_share",
    }
    assert ved["cap_ms"] == 50 and ved["clients"] == 2
    # each share is rounded to 3 decimals: two rounded up and one down can differ by 0.0015 (3/18 + 1/18 vs 4/18)
    assert 0 <= ved["fallback_share"] + ved["popular_share"] <= ved["cap_hit_share"] + 0.0015
    assert ved["cap_hit_share"] <= 1
    (mixed,) = out["mixed"]  # one beam client beside 2 VED clients (the default) at the largest cap
    assert set(mixed) == {"cap_ms", "ved_clients", "beam", "ved", "beam_p50_vs_alone", "beam_p99_vs_alone"}
    assert (mixed["cap_ms"], mixed["ved_clients"], mixed["beam"]["errors"], mixed["ved"]["errors"]) == (50, 2, 0, 0)
    assert set(mixed["ved"]) == set(ved) - {"cap_ms", "clients"} and mixed["beam_p99_vs_alone"] > 0


def test_lean_client_reads_answers_and_errors_over_one_connection(tiny_checkpoint: Path) -> None:
    async def talk(url: str) -> list[tuple[int, bytes, float]]:
        client = LeanClient(url, timeout_s=30.0)
        try:
            answers = [await client.post("/recommend", body) for body in ({"history": [1], "k": 3}, {"k": 3}) * 2]
        finally:
            await client.aclose()
        assert client.connects == 1, "the connection was not kept alive"
        return answers

    with running_server(tiny_checkpoint, True, BenchConfig(torch_threads=1)) as url:
        answers = asyncio.run(talk(url))
    assert [status for status, _, _ in answers] == [200, 422, 200, 422]
    ok, bad = json.loads(answers[0][1]), json.loads(answers[1][1])
    assert len(ok["items"]) == 3 and "history" in bad["error"]["message"]
    assert all(0 < seconds < 30 for _, _, seconds in answers)


def test_a_cell_the_server_refused_whole_stops_the_bench_instead_of_reporting_nulls() -> None:
    from service.bench import BenchCutShort, CellResult, refused

    out: dict[str, list[dict[str, Any]]] = {"beam": [{"clients": 1}], "ved": []}
    refused("beam clients=1", CellResult(latencies_ms=[3.0], errors=["503 busy"]), out)  # some answered: measured
    with pytest.raises(BenchCutShort, match=r"^ved cap=50 ms clients=1: the server refused all 2 requests \(422 "):
        refused("ved cap=50 ms clients=1", CellResult(errors=["422 latency_ms", "422 latency_ms"]), out)


def test_bench_serve_refuses_caps_and_k_the_server_would_refuse_before_it_runs(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VSTAR_VED_MAX_LATENCY_MS", "300")
    result = CliRunner().invoke(app, ["bench", "serve", "--checkpoint", str(tiny_checkpoint), "--caps", "100,400"])
    assert result.exit_code == 2 and "400 ms is above the server's VSTAR_VED_MAX_LATENCY_MS (300 ms)" in result.output
    # a k above VSTAR_MAX_K started the server, which refused every request: one line, but after the start
    monkeypatch.setenv("VSTAR_MAX_K", "5")
    monkeypatch.setenv("VSTAR_DEFAULT_K", "5")
    args = ["--caps", "100", "--k", "10", "--clients", "1", "--ved-clients", "1", "--duration-s", "0.2"]
    result = CliRunner().invoke(app, ["bench", "serve", "--checkpoint", str(tiny_checkpoint), *args])
    assert result.exit_code == 2 and "10 is above the server's VSTAR_MAX_K (5)" in result.output, result.output


def test_bench_config_is_bounded() -> None:
    with pytest.raises(ValueError):
        BenchConfig(clients=(0,))
    with pytest.raises(ValueError):
        BenchConfig(duration_s=0)


def test_deadline_margin_learns_the_overrun_and_forgets_it() -> None:
    now = [0.0]
    margin = DeadlineMargin(floor_s=0.003, quantile=0.9, horizon_s=0.2, clock=lambda: now[0])
    assert margin.deadline(10.0, 50) == pytest.approx(10.047)
    for overrun in [0.004] * 9 + [0.010]:
        margin.report(overrun)
    assert 0.003 + 0.004 <= margin.margin_s() <= 0.003 + 0.010
    margin.report(-0.02)  # a request that finished early never lowers the margin below the floor
    assert margin.margin_s() >= 0.003
    now[0] = 0.19  # still within the horizon
    assert margin.margin_s() > 0.003
    now[0] = 0.25  # past it: every report has expired
    assert margin.margin_s() == pytest.approx(0.003)
