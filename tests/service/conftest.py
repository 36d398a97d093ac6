"""Service test fixtures: a tiny checkpoint on disk, the real Redis, settings, a client factory.

Redis is the real server at 127.0.0.1:6379 (``.ci/run`` starts one), DB index
15 only, flushed before and after the session; tests skip with the reason when
nothing answers there. Outage tests run their own ``redis-server`` on a free
port (``private_redis``) so they can stop and restart it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from models.checkpoint import save_checkpoint
from models.policy import Policy
from service.settings import Settings

REDIS_TEST_URL = "redis://127.0.0.1:6379/15"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_policy: Policy) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("service") / "ckpt", tiny_policy, manifest={"note": "service tests"})


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=0.5)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as e:
        pytest.skip(f"no Redis at 127.0.0.1:6379 ({e}); CI starts redis-server, locally run `redis-server &`")
    client.flushdb()
    yield REDIS_TEST_URL
    client.flushdb()
    client.close()


@pytest.fixture
def clean_redis(redis_url: str) -> Iterator[str]:
    """The test DB, flushed after the test."""
    yield redis_url
    redis.Redis.from_url(redis_url).flushdb()


@pytest.fixture(scope="session")
def make_settings(tiny_checkpoint: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {"checkpoint": tiny_checkpoint, "access_log": False, "log_level": "WARNING"}
        return Settings(**(base | overrides))

    return make


def wait_until(check: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Whether ``check()`` came true within ``timeout_s`` (polled every 50 ms)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.05)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A redis-server on a free loopback port that a test may stop and start again."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.proc is None
        # DEBUG SLEEP stalls it on demand (a slow Redis); since Redis 7 DEBUG must be enabled
        debug = ["--enable-debug-command", "yes"] if self.major_version() >= 7 else []
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *debug],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def major_version(self) -> int:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True, check=True).stdout
        return int(out.split("v=")[1].split(".")[0])

    def stall(self, seconds: float) -> threading.Thread:
        """Block the server for ``seconds`` (``DEBUG SLEEP``), from a thread; returns once the stall has begun."""
        client = redis.Redis(port=self.port)
        thread = threading.Thread(target=client.execute_command, args=("DEBUG", "SLEEP", seconds))
        thread.start()
        # asleep when a ping goes unanswered (a fixed pause could end before a loaded host sent the command)
        probe = redis.Redis(port=self.port, socket_timeout=0.02, retry=Retry(NoBackoff(), 0))
        give_up = time.monotonic() + 5.0
        try:
            while time.monotonic() < give_up:
                probe.ping()
                time.sleep(0.005)
        except redis.exceptions.TimeoutError:
            return thread
        finally:
            probe.close()
        raise RuntimeError(f"redis-server on port {self.port} still answered 5 s after DEBUG SLEEP {seconds}")

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed; the outage tests start and stop their own")
    server = PrivateRedis(binary)
    server.start()
    yield server
    if server.proc is not None:
        server.stop()


@pytest.fixture
def dead_redis_url() -> str:
    """A Redis URL where nothing listens."""
    return f"redis://127.0.0.1:{free_port()}/0"
