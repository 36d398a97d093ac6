"""Startup fails fast and loudly on a bad checkpoint; a good value head is loaded, a missing one replaced."""

from __future__ import annotations

import gc
import logging
import shutil
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import service.cli
from models.checkpoint import CheckpointError, save_checkpoint
from models.policy import Policy
from models.value_head import ValueHead, ValueHeadConfig, value_head_for
from service.app import create_app
from service.decode_scheduler import DecodeRow
from service.errors import StartupError
from service.json_logs import JsonFormatter, redact_urls
from service.recommender import Recommender
from service.settings import Settings
from service.warmup_signals import stopped
from tests.conftest import make_catalog
from tests.service.conftest import free_port
from vstar import app

REPO = Path(__file__).resolve().parents[2]


def start(settings: Settings) -> None:
    with TestClient(create_app(settings)) as c:
        c.get("/healthz")


def test_no_checkpoint_configured(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint configured"):
        start(make_settings(checkpoint=None))


def test_missing_checkpoint_folder(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        start(make_settings(checkpoint=tmp_path / "nope"))


def test_corrupt_manifest(make_settings: Callable[..., Settings], tiny_checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json is not valid JSON"):
        start(make_settings(checkpoint=broken))


def test_value_head_of_the_wrong_size(
    make_settings: Callable[..., Settings], tiny_policy: Policy, tmp_path: Path
) -> None:
    wrong = ValueHead(ValueHeadConfig(hidden_size=16, num_heads=2))
    path = save_checkpoint(
        tmp_path / "wrong",
        tiny_policy,
        manifest={"value_head": asdict(ValueHeadConfig(32))},
        extras={"value_head": wrong.state_dict()},
    )
    with pytest.raises(CheckpointError, match=r"value_head.safetensors does not fit manifest\[.value_head.\]"):
        start(make_settings(checkpoint=path))


def test_value_head_is_loaded_from_the_checkpoint(
    make_settings: Callable[..., Settings], tiny_policy: Policy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    head = value_head_for(tiny_policy)
    path = save_checkpoint(
        tmp_path / "vstar",
        tiny_policy,
        manifest={"value_head": asdict(head.config)},
        extras={"value_head": head.state_dict()},
    )
    app = create_app(make_settings(checkpoint=path))
    with caplog.at_level(logging.WARNING), TestClient(app):
        loaded = app.state.recommender.value_head
        for name, tensor in head.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor)
    assert not [r for r in caplog.records if "no value head" in r.getMessage()]


def test_settings_reject_inconsistent_defaults(tiny_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="VSTAR_DEFAULT_K=20 exceeds VSTAR_MAX_K=10"):
        Settings(checkpoint=tiny_checkpoint, default_k=20, max_k=10)
    with pytest.raises(ValueError, match="VSTAR_VED_DEFAULT_LATENCY_MS=500 exceeds VSTAR_VED_MAX_LATENCY_MS=100"):
        Settings(checkpoint=tiny_checkpoint, ved_default_latency_ms=500, ved_max_latency_ms=100)
    with pytest.raises(ValueError, match="VSTAR_VED_MARGIN_MS=5000 plus VSTAR_VED_RESPOND_MS=4 leave no search time"):
        Settings(checkpoint=tiny_checkpoint, ved_margin_ms=5000)
    # a default cap the reserves fill: every VED request that gives no cap went to popularity, without a word
    with pytest.raises(ValueError, match="VSTAR_VED_RESPOND_MS=4 leave no search time within VSTAR_VED_DEFAULT_LAT"):
        Settings(checkpoint=tiny_checkpoint, ved_default_latency_ms=9)
    assert Settings(checkpoint=tiny_checkpoint, ved_default_latency_ms=10).ved_default_latency_ms == 10
    with pytest.raises(ValueError, match="'gpu0' is not a torch device"):
        Settings(checkpoint=tiny_checkpoint, device="gpu0")
    with pytest.raises(ValueError, match="database in the Redis URL must be a number .* got 'abc'"):
        Settings(checkpoint=tiny_checkpoint, redis_url="redis://127.0.0.1:6379/abc")


def test_a_redis_that_refuses_the_database_stops_the_start(
    make_settings: Callable[..., Settings], redis_url: str
) -> None:
    """Not an outage (served degraded until Redis answers): Redis answered, and no retry will change its answer."""
    settings = make_settings(redis_url=redis_url.rsplit("/", 1)[0] + "/100000")
    with pytest.raises(
        StartupError, match=r"redis refused the settings of REDIS_URL \(or VSTAR_REDIS_URL\): ResponseError: DB index"
    ):
        with TestClient(create_app(settings)):
            pass


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/3")
    monkeypatch.setenv("VSTAR_CHECKPOINT", str(tiny_checkpoint))
    monkeypatch.setenv("VSTAR_BATCH_MAX_SIZE", "4")
    s = Settings()
    assert str(s.redis_url) == "redis://127.0.0.1:6379/3" and s.checkpoint == tiny_checkpoint and s.batch_max_size == 4


def test_a_fresh_value_head_is_the_same_in_every_worker(make_settings: Callable[..., Settings]) -> None:
    heads = []
    for _ in range(2):
        app = create_app(make_settings())
        with TestClient(app):
            heads.append(app.state.recommender.value_head.state_dict())
    assert all(torch.equal(heads[0][name], heads[1][name]) for name in heads[0])


def test_secrets_never_reach_the_logs(
    make_settings: Callable[..., Settings], dead_redis_url: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """The startup settings line and the Redis warnings print the URL without its password."""
    url = dead_redis_url.replace("redis://", "redis://vstar:s3cret-pw@")
    with TestClient(create_app(make_settings(redis_url=url, log_level="INFO"))) as c:
        assert c.post("/users/x/events", json={"items": [1]}).status_code == 503
    logged = capfd.readouterr().err
    assert '"msg": "settings"' in logged and "redis unavailable" in logged
    assert "s3cret-pw" not in logged and "redis://vstar:***@127.0.0.1" in logged


def test_a_password_in_the_redis_urls_query_never_reaches_the_logs(
    make_settings: Callable[..., Settings], dead_redis_url: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """redis-py takes the password from the query too (``?password=``): the settings line printed it whole."""
    with TestClient(create_app(make_settings(redis_url=dead_redis_url + "?password=s3cret-pw", log_level="INFO"))):
        pass
    logged = capfd.readouterr().err
    assert '"msg": "settings"' in logged and "s3cret-pw" not in logged and "?password=***" in logged


def test_the_log_formatter_masks_credentials_in_any_url() -> None:
    record = logging.makeLogRecord({"msg": "cannot reach %s", "args": ("rediss://u:p%40ss@h:6380/1",)})
    assert JsonFormatter().format(record).count("rediss://u:***@h:6380/1") == 1
    # the TLS key's passphrase, which redis-py reads from the query too, was printed whole
    tls = "rediss://h:6380/1?ssl_keyfile=/k.pem&ssl_password=KEYPASS&password=s3cret-pw"
    assert redact_urls(tls) == "rediss://h:6380/1?ssl_keyfile=/k.pem&ssl_password=***&password=***"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        # a password holding '/', '?' or '#' ends the host early: its tail was echoed as "the database", or the
        # URL passed and was logged with it at start-up
        ("redis://default:4821/Zk9qSecretTail@redis.internal:6379/0", "an '@' after the host: a password holding"),
        ("redis://default:4821?Zk9qSecretTail@127.0.0.1:6379/0", "must be percent-encoded (%2F, %3F, %23)"),
        ("redis://default:4821#Zk9qSecretTail@127.0.0.1:6379/0", "must be percent-encoded"),
        # query settings redis-py reads: a traceback once the model had loaded
        (
            "redis://:Zk9qSecretTail@127.0.0.1:6379/6?db=abc",
            "redis-py cannot read the Redis URL: Invalid value for 'db'",
        ),
        ("redis://:Zk9qSecretTail@127.0.0.1:6379/6?ssl_cert_reqs=x", "takes no query parameter 'ssl_cert_reqs'"),
    ],
)
def test_a_redis_url_redis_py_cannot_use_is_one_line_that_shows_no_secret(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, url: str, message: str
) -> None:
    monkeypatch.setenv("REDIS_URL", url)
    monkeypatch.setattr(service.cli, "_run", lambda config: pytest.fail("the server started"))
    result = CliRunner().invoke(app, ["serve", "--checkpoint", str(tiny_checkpoint)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert "Zk9q" not in result.output


def test_an_api_key_no_client_can_send_is_refused_without_showing_it(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starlette reads headers as Latin-1: a key with 'é' never matched what clients send (its UTF-8 bytes)."""
    monkeypatch.setenv("VSTAR_API_KEYS", "ok-key,clé-secrète")
    monkeypatch.setattr(service.cli, "_run", lambda config: pytest.fail("the server started"))
    result = CliRunner().invoke(app, ["serve", "--checkpoint", str(tiny_checkpoint)])
    assert result.exit_code == 2 and "key 2 holds a character outside printable ASCII" in result.output
    assert "secr" not in result.output


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("fusion_weight", float("inf"), "finite number"),  # every answer would be empty
        ("batch_max_wait_ms", float("inf"), "finite number"),  # a batch would wait for company for ever
        ("batch_max_wait_ms", 5000.0, "less than or equal to 1000"),
        ("redis_timeout_s", float("inf"), "finite number"),  # an outage would never be bounded
        ("idempotency_ttl_s", 10**20, "less than or equal to 315360000"),  # past Redis's range: events stored twice
        ("stored_history_max", 10**20, "less than or equal to 1000000"),
    ],
)
def test_settings_refuse_infinities_and_values_redis_cannot_take(
    tiny_checkpoint: Path, name: str, value: float, message: str
) -> None:
    with pytest.raises(ValueError, match=rf"{name}\n  Input should be (a )?{message}"):
        Settings(checkpoint=tiny_checkpoint, **{name: value})


def test_serve_names_a_bad_setting_without_echoing_its_value(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:s3cret-pw@127.0.0.1:notaport/0")
    result = CliRunner().invoke(app, ["serve", "--checkpoint", str(tiny_checkpoint)])
    assert result.exit_code != 0 and "REDIS_URL (or VSTAR_REDIS_URL): " in result.output  # the name it was read as
    assert "s3cret-pw" not in result.output


def model_threads() -> int:
    return sum(t.name.startswith("vstar-model") and t.is_alive() for t in threading.enumerate())


def test_a_warm_up_that_decodes_nothing_fails_the_start_even_under_python_O(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real exception, not an assert (``python -O`` drops those and would serve a model that answers nothing);
    the failed start leaves no model thread behind."""
    monkeypatch.setattr(Recommender, "decode", lambda self, key, jobs: [DecodeRow([-1], [0.0]) for _ in jobs])
    before = model_threads()
    with pytest.raises(CheckpointError, match="warm-up decode"):
        start(make_settings())
    assert model_threads() == before


def test_a_stopped_app_lets_its_model_go(make_settings: Callable[..., Settings]) -> None:
    """The start freezes the heap out of the collector's reach (gc.freeze); the stop gives it back, or every app
    a process started and stopped would keep its model (the recommender sits in a reference cycle)."""
    app = create_app(make_settings())
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        recommender = weakref.ref(app.state.recommender)
    gc.collect()
    assert recommender() is None and gc.get_freeze_count() == 0


def test_sids_of_one_token_stop_the_start_in_one_line(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """VED searches over SID prefixes, which one-token SIDs (vstar sids --levels 1) lack: the warm-up's VED
    decode died with a traceback; now the start stops with a CheckpointError, the one log line."""
    policy = Policy.from_preset("tiny", make_catalog(40, codes=(50,)), seed=0)
    path = save_checkpoint(tmp_path / "flat", policy, manifest={"note": "one-token SIDs"})
    with pytest.raises(CheckpointError, match="SIDs of 1 token: the service also answers with VED"):
        start(make_settings(checkpoint=path))


def test_a_signal_the_model_thread_receives_still_stops_the_warm_up(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel hands a process's SIGTERM to any of its threads. When the model thread got it, Python ran the
    handler only once the main thread ran again: it slept in one wait for the whole warm-up, which then went on
    to the end (seen in CI: 10 s of warm-up after the signal). The main thread now waits in slices."""
    with TestClient(create_app(make_settings())) as client:
        recommender = client.app.state.recommender  # type: ignore[attr-defined]

        def warmup(stop: threading.Event) -> None:  # on the model thread, as the real one runs
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # delivered to this thread alone
            if not stop.wait(2.0):
                raise AssertionError("the signal did not reach the warm-up")
            stopped(stop)

        monkeypatch.setattr(recommender, "_warmup", warmup)
        assert threading.current_thread() is threading.main_thread()  # where Python runs signal handlers
        with pytest.raises(StartupError, match="stopped by a signal during the warm-up"):
            recommender.warmup()


def test_a_sigterm_during_the_warm_up_stops_the_start(tiny_checkpoint: Path) -> None:
    """A replica stopped while it warms up exits at the warm-up's next decode, not after the whole warm-up."""
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "VSTAR_BATCH_MAX_SIZE": "1024"}
    cmd = [sys.executable, "-m", "vstar", "serve", "--checkpoint", str(tiny_checkpoint), "--port", str(free_port())]
    server = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    assert server.stderr is not None
    lines = []
    for line in server.stderr:  # the JSON log; the warm-up of 11 batch sizes up to 1024 takes many seconds
        lines.append(line)
        if '"warming up"' in line:
            server.send_signal(signal.SIGTERM)
            break
    _, rest = server.communicate(timeout=120)
    log = "".join(lines) + (rest or "")
    assert "startup failed: stopped by a signal during the warm-up" in log, log
    assert "Application startup complete" not in log and server.returncode != 0


def test_a_port_in_use_stops_the_start_before_the_model_loads(tiny_checkpoint: Path) -> None:
    """One worker bound its port only after the app's start-up (model, warm-up: minutes for a real model)."""
    import socket

    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "vstar", "serve", "--checkpoint", str(tiny_checkpoint), "--port", str(port)]
        run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 3 and "Address already in use" in run.stderr, run.stderr[-2000:]
    assert "Waiting for application startup" not in run.stderr and "warm-up" not in run.stderr, run.stderr[-2000:]


def test_the_server_never_imports_training() -> None:
    """README, "Layout": the server imports models alone; only the offline commands bridge to training."""
    code = "import sys, service.app; print(sorted({m.split('.')[0] for m in sys.modules} & {'training', 'loadtests'}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
