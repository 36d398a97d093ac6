"""``vstar demo``: its summary, its example request (which the README shows), and one log format per process."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.checkpoint import save_checkpoint
from models.policy import Policy
from service.app import create_app
from service.settings import Settings
from training.data.sid_builder import SidBuildConfig
from training.data.synth import SynthConfig, write_synth
from training.demo import (
    curl_command,
    demo_folder_problem,
    demo_steps,
    example_request,
    figure,
    rl_holdout,
    rl_note,
)
from training.evaluation.compare import row_metric

REPO = Path(__file__).resolve().parents[1]


def test_rl_trains_on_valid_less_the_most_recent_third_which_chooses(tiny_data_dir: Path, tmp_path: Path) -> None:
    """SFT fits train; the demo's RL trains on rows SFT never trained on (valid), holding out its last third."""
    assert rl_holdout(tiny_data_dir) == 40 // 3  # the fixture's valid has 40 rows
    steps = {args[0]: args for args in demo_steps(tmp_path, 60, 154)}
    rl = steps["rl"]
    option = {rl[i]: rl[i + 1] for i in range(len(rl) - 1) if rl[i].startswith("--")}
    assert option["--train-splits"] == "valid" and option["--holdout"] == "154" and option["--max-steps"] == "60"
    assert option["--eval-every"] == "20" and "--train-splits" not in steps["sft"]  # SFT: train, valid chooses


def test_a_metric_not_measured_prints_as_a_dash() -> None:
    assert figure(None) == "-" and figure(0.38664) == "0.3866"


def test_the_example_request_is_answered_by_a_model_of_that_data(
    tiny_data_dir: Path, tiny_policy: Policy, tmp_path: Path
) -> None:
    request = example_request(tiny_data_dir)
    assert request["k"] == 5 and 1 <= len(request["history"]) <= 3
    checkpoint = save_checkpoint(tmp_path / "ckpt", tiny_policy)  # the catalog tiny_data_dir was written from
    with TestClient(create_app(Settings(checkpoint=checkpoint, access_log=False, log_level="WARNING"))) as client:
        answer = client.post("/recommend", json=request)
    assert answer.status_code == 200 and len(answer.json()["items"]) == 5


def test_the_readme_shows_the_request_the_demo_prints(tmp_path: Path) -> None:
    write_synth(tmp_path / "data", SynthConfig(), SidBuildConfig(None, seed=0))  # what `vstar synth --out` writes
    assert curl_command(example_request(tmp_path / "data"), 8000) in (REPO / "README.md").read_text()


def result(ranks: list[int | None]) -> dict[str, Any]:
    """An eval result of these 0-based target ranks (None: not ranked), as vstar eval writes it."""
    found = [-1 if r is None else r for r in ranks]
    metrics = {m: float(row_metric(np.array(found), m).mean()) for m in ("HR@10", "NDCG@10")}
    return {"metrics": metrics, "rows": len(ranks), "target_ranks": ranks}


def test_rl_below_sft_is_explained_against_the_noise_of_each_metric() -> None:
    sft = result([0] * 100 + [5] * 100 + [None] * 200)
    assert rl_note(sft, result([0] * 100 + [5] * 101 + [None] * 199), 30) is None  # above on both
    # ten rows fall out of the top 10, six come in, one moves from rank 0 to 1: within two standard errors
    noise = rl_note(sft, result([1] + [0] * 99 + [5] * 90 + [None] * 10 + [5] * 6 + [None] * 194), 30)
    assert noise is not None and noise.startswith("V-STAR ended below SFT (HR@10 -0.0100, NDCG@10 -0.0045). That")
    diff = np.array([-1.0] * 10 + [1.0] * 6 + [0.0] * 384)  # HR@10's per-row differences
    se = diff.std(ddof=1) / np.sqrt(400)
    assert f"on 400 test rows: HR@10 {se:.4f}, NDCG@10 " in noise and "noise, not a finding" in noise
    # HR@10 level, NDCG@10 far down: every hit moved from rank 0 to 9 (a binomial error of HR@10 called it noise)
    worse = rl_note(sft, result([9] * 100 + [5] * 100 + [None] * 200), 30)
    assert worse is not None and worse.startswith("V-STAR ended below SFT (NDCG@10 -0.1777), on NDCG@10 by more")
    assert "made this model worse" in worse
    fused = rl_note(
        sft, result([0] * 99 + [None] + [5] * 100 + [None] * 200), 30, ("SFT + transitions", "V-STAR + transitions")
    )
    assert fused is not None and fused.startswith("V-STAR + transitions ended below SFT + transitions (HR@10")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_lines(stream: object, into: list[str]) -> threading.Thread:
    thread = threading.Thread(target=lambda: into.extend(iter(stream.readline, "")), daemon=True)  # type: ignore[attr-defined]
    thread.start()
    return thread


@pytest.mark.slow
def test_demo_reports_serves_its_own_request_and_logs_one_format_per_process(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    write_synth(out / "data", SynthConfig(items=80, users=60), SidBuildConfig(None, seed=0))  # small: the demo keeps it
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vstar", "demo", "--out", str(out), "--rl-steps", "2", "--port", str(port)],
        cwd=REPO, env=os.environ | {"OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    stdout: list[str] = []
    stderr: list[str] = []
    readers = [read_lines(proc.stdout, stdout), read_lines(proc.stderr, stderr)]
    try:
        deadline = time.monotonic() + 900
        while not any("Ctrl-C stops it" in line for line in stdout):
            assert proc.poll() is None, "".join(stderr[-30:])
            assert time.monotonic() < deadline, "the demo did not reach its summary in 15 minutes"
            time.sleep(0.5)
        (curl,) = [line.strip() for line in stdout if line.strip().startswith("curl ")]
        assert curl == curl_command(example_request(out / "data"), port)
        request = json.loads(curl.split(" -d '", 1)[1].rstrip("'"))
        answer = httpx.post(f"http://127.0.0.1:{port}/recommend", json=request, timeout=30)
        assert answer.status_code == 200 and len(answer.json()["items"]) == 5
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, to the demo and its server
        code = proc.wait(timeout=60)
        for reader in readers:
            reader.join(timeout=10)
    assert code == 0, "".join(stderr[-30:])
    text = "".join(stdout)
    for model in ("pop", "SFT", "V-STAR", "SFT + transitions", "V-STAR + transitions"):
        assert any(re.fullmatch(rf"\s+{re.escape(model)}\s+0\.\d{{4}}\s+0\.\d{{4}}\s*", line) for line in stdout), text
    assert f"Files in {out}:" in text
    for name in (
        "curves.png",
        "sft.tb",
        "vstar.tb",
        "pop.test.json",
        "sft.test.json",
        "vstar.test.json",
        "sft_fused.test.json",
        "vstar_fused.test.json",
        "sft.resume",
        "vstar.resume",
    ):
        assert (out / name).exists(), name
    assert not any(line.startswith("{") for line in stdout), "a step's JSON reached the screen"
    banner = next(i for i, line in enumerate(stderr) if line.startswith("starting the service on"))
    served = [line for line in stderr[banner + 1 :] if line.strip()]
    assert served and all(isinstance(json.loads(line), dict) for line in served), served[:5]
    assert any(json.loads(line)["msg"] == "Application startup complete." for line in served)


def test_a_second_demo_into_the_same_folder_replaces_its_runs(tmp_path: Path) -> None:
    """SFT and RL refuse a fresh run onto an earlier one's files without --force: the demo's own steps pass it,
    so a rerun trains again (each checkpoint replaced atomically as the new one is written)."""
    steps = {args[0]: args for args in demo_steps(tmp_path, 60, 154)}
    assert "--force" in steps["sft"] and "--force" in steps["rl"]


def test_the_demo_writes_only_into_a_new_empty_or_earlier_demo_folder(tmp_path: Path) -> None:
    earlier, foreign, ckpt, data, afile = (tmp_path / n for n in ("earlier", "foreign", "ckpt", "data", "afile"))
    (earlier / "data").mkdir(parents=True)
    (earlier / "data" / "index.json").write_text("{}")
    (earlier / "data" / "stats.json").write_text(json.dumps({"dataset": "synthetic"}))
    (earlier / "sft").mkdir()
    (earlier / "sft.json").write_text("{}")
    (earlier / ".sft.tmp-x").mkdir()  # a killed write's staging folder
    # a data set of one's own beside a checkpoint of one's own was taken for an earlier demo's and replaced
    own = tmp_path / "own"
    shutil.copytree(earlier, own)
    (own / "data" / "stats.json").write_text(json.dumps({"dataset": "imported"}))
    mixed = tmp_path / "mixed"
    shutil.copytree(earlier, mixed)
    (mixed / "notes.txt").write_text("mine")
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    ckpt.mkdir()
    (ckpt / "manifest.json").write_text("{}")
    data.mkdir()
    (data / "index.json").write_text("{}")
    afile.write_text("mine")
    (tmp_path / "empty").mkdir()
    for ok in (tmp_path / "new", tmp_path / "empty", earlier):
        assert demo_folder_problem(ok) is None, ok
    for out, message in [
        (foreign, "holds files an earlier demo did not write"),
        (own, "holds files an earlier demo did not write (no vstar synth data set at data/)"),
        (mixed, "holds files an earlier demo did not write (notes.txt)"),
        (ckpt, "is a checkpoint"),
        (data, "is a data set"),
        (afile, "is a file, not a folder"),
    ]:
        problem = demo_folder_problem(out)
        assert problem is not None and message in problem, (out, problem)


def test_a_step_stopped_by_ctrl_c_stops_the_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step's Ctrl-C ends that step with status 130 (typer's); the demo must not go on to the next one."""
    import typer

    import vstar

    steps: list[list[str]] = []

    def interrupted(args: list[str], standalone_mode: bool) -> int:
        steps.append(args)
        return 130

    monkeypatch.setattr(vstar, "app", interrupted)
    with pytest.raises(typer.Exit) as stopped:
        vstar.demo(out=tmp_path / "demo", serve=False, port=8000, rl_steps=1)
    assert stopped.value.exit_code == 130 and [args[0] for args in steps] == ["synth"]


def test_a_port_in_use_is_refused_before_the_demo_trains(tmp_path: Path) -> None:
    """The port was found taken only after the training; another service answering there was taken for the
    demo's own, which failed to start, and the demo said it answers and ended with status 0."""
    from typer.testing import CliRunner

    import vstar

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(vstar.app, ["demo", "--out", str(tmp_path / "demo"), "--port", str(port)])
    assert result.exit_code == 2 and f"127.0.0.1:{port} is in use" in result.output, result.output
    assert not (tmp_path / "demo").exists()


def test_sigterm_to_the_demo_stops_its_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service was a child that outlived a demo stopped by SIGTERM (kill, timeout) or SIGHUP, holding its
    port."""
    import service.serve_command
    import vstar

    port = free_port()
    stub = (
        "import http.server as h\n"
        "class R(h.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.send_header('content-length', '0'); self.end_headers()\n"
        "    def log_message(self, *a): pass\n"
        f"h.HTTPServer(('127.0.0.1', {port}), R).serve_forever()\n"
    )
    started: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def popen(cmd: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        started.append(real_popen(cmd, **kwargs))  # type: ignore[call-overload]
        return started[-1]

    monkeypatch.setattr(service.serve_command, "serve_command", lambda checkpoint, p: [sys.executable, "-c", stub])
    monkeypatch.setattr(vstar.subprocess, "Popen", popen)
    kill = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))  # once it says the service is ready
    monkeypatch.setattr(vstar.typer, "echo", lambda *a, **k: kill.start())

    def unhandled(signum: int, frame: object) -> None:  # what a SIGTERM the demo leaves alone meets (not death)
        raise AssertionError("the demo does not handle SIGTERM")

    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        with pytest.raises(SystemExit) as stopped:
            vstar.serve_until_stopped(Path("ckpt"), port, "ready")
        assert signal.getsignal(signal.SIGTERM) is unhandled  # its own handler was for the service's lifetime
    finally:
        signal.signal(signal.SIGTERM, before)
        for child in started:
            if child.poll() is None:
                child.kill()
    assert stopped.value.code == 128 + signal.SIGTERM
    assert started and started[0].returncode is not None  # the service stopped with the demo
