"""Event writes are exactly-once: against a Redis that stalls, and with a client that retries.

A stall is ``DEBUG SLEEP`` on the private redis-server (``private_redis``): the
write is sent, Redis answers only after the client's 0.25 s timeout. Whatever
the service answers then must be true: 200 means the events are stored once,
503 "not stored" means nothing is stored, and a retry with the same
``Idempotency-Key`` never stores twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.redis_store import HISTORY_KEY, WRITE, RedisStore
from service.settings import Settings
from service.stores import Appended
from tests.service.conftest import PrivateRedis


@pytest.fixture
def stalling(make_settings: Callable[..., Settings], private_redis: PrivateRedis) -> Iterator[TestClient]:
    settings = make_settings(redis_url=private_redis.url, redis_timeout_s=0.25, redis_retry_after_s=0.0)
    with TestClient(create_app(settings)) as c:
        yield c


def stored(server: PrivateRedis, user: str) -> list[bytes]:
    return redis.Redis(port=server.port).lrange(HISTORY_KEY.format(user), 0, -1)


def wait(thread: threading.Thread) -> None:
    thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.mark.parametrize("stall_s", [0.4, 0.8])
def test_a_write_stalled_less_than_the_settling_time_is_stored_once(
    stalling: TestClient, private_redis: PrivateRedis, stall_s: float
) -> None:
    """Each copy sent times out (0.25 s) while Redis sleeps; they queue, and the first to run stores (the
    settling time, 1 s, outlasts the stall, so an answer comes): a 200 and one entry, never two. A longer stall
    is the next test but two."""
    for attempt in range(3):
        user = f"slow{attempt}"
        sleeper = private_redis.stall(stall_s)
        r = stalling.post(f"/users/{user}/events", json={"items": [7]})
        wait(sleeper)
        assert r.status_code == 200 and r.json()["appended"] == 1, r.text
        assert stored(private_redis, user) == [b"7"]


def test_a_retry_with_the_same_idempotency_key_never_stores_twice(
    stalling: TestClient, private_redis: PrivateRedis
) -> None:
    headers = {"Idempotency-Key": "order-1234-line-1"}
    sleeper = private_redis.stall(0.6)
    first = stalling.post("/users/kim/events", json={"items": [3, 4]}, headers=headers)
    wait(sleeper)
    assert first.status_code == 200, first.text  # the stall is shorter than the settling time
    for _ in range(2):  # the client retries as told, twice
        again = stalling.post("/users/kim/events", json={"items": [3, 4]}, headers=headers)
        assert again.status_code == 200 and again.json() == {"user_id": "kim", "appended": 2, "history_length": 2}
        assert again.headers["idempotent-replayed"] == "true"
    assert stored(private_redis, "kim") == [b"3", b"4"]
    # another key is another write; the same key for other items is a client bug, refused
    assert stalling.post("/users/kim/events", json={"items": [5]}, headers={"Idempotency-Key": "k2"}).status_code == 200
    clash = stalling.post("/users/kim/events", json={"items": [6]}, headers=headers)
    assert clash.status_code == 422 and clash.json()["error"]["message"].startswith("Idempotency-Key:")
    assert stored(private_redis, "kim") == [b"3", b"4", b"5"]


def test_keys_of_different_users_never_share_a_record(stalling: TestClient, private_redis: PrivateRedis) -> None:
    assert stalling.post("/users/a/events", json={"items": [7]}, headers={"Idempotency-Key": "b:c"}).status_code == 200
    r = stalling.post("/users/a:b/events", json={"items": [8]}, headers={"Idempotency-Key": "c"})
    assert r.status_code == 200 and r.json()["appended"] == 1, r.text
    assert len(stored(private_redis, "a")) == 1 and len(stored(private_redis, "a:b")) == 1


def test_a_stall_longer_than_the_settling_time_says_the_outcome_is_unknown(
    make_settings: Callable[..., Settings], private_redis: PrivateRedis
) -> None:
    settings = make_settings(
        redis_url=private_redis.url, redis_timeout_s=0.2, redis_retry_after_s=0.0, redis_write_settle_s=0.3
    )
    headers = {"Idempotency-Key": "k-long"}
    with TestClient(create_app(settings)) as c:
        sleeper = private_redis.stall(1.5)
        r = c.post("/users/lee/events", json={"items": [9]}, headers=headers)
        wait(sleeper)
        assert r.status_code == 503 and "may have been stored" in r.json()["error"]["message"], r.text
        retry = c.post("/users/lee/events", json={"items": [9]}, headers=headers)
        assert retry.status_code == 200 and retry.json()["history_length"] == 1
    assert stored(private_redis, "lee") == [b"9"]


def test_a_write_to_a_redis_that_refuses_connections_says_not_stored_at_once(
    make_settings: Callable[..., Settings], private_redis: PrivateRedis
) -> None:
    """Redis down (the connection refused): nothing was sent, so the 503 says "not stored" and comes at once,
    not after the settling time of a write that may have run. The breaker is off, so each write tries Redis."""
    settings = make_settings(redis_url=private_redis.url, redis_retry_after_s=0.0, redis_write_settle_s=2.0)
    with TestClient(create_app(settings)) as c:
        private_redis.stop()
        for _ in range(2):
            r = c.post("/users/ray/events", json={"items": [4]})  # sent again until settled, "may have been stored"
            assert r.status_code == 503 and "the events were not stored, retry" in r.json()["error"]["message"], r.text
        private_redis.start()


@pytest.mark.parametrize("key", ["", "x" * 300, "has space", "tab\there"])
def test_a_malformed_idempotency_key_is_422_naming_the_header(stalling: TestClient, key: str) -> None:
    r = stalling.post("/users/kim/events", json={"items": [1]}, headers={"Idempotency-Key": key})
    assert r.status_code == 422 and "Idempotency-Key" in r.json()["error"]["message"], r.text


def test_the_in_process_store_honours_idempotency_keys_too(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings())) as c:
        for _ in range(3):
            r = c.post("/users/mo/events", json={"items": [1]}, headers={"Idempotency-Key": "once"})
            assert r.status_code == 200 and r.json()["history_length"] == 1
        assert c.post("/users/mo/events", json={"items": [1]}).json()["history_length"] == 2  # no key: a new event
        assert c.post("/users/mo/events", json={"items": [2]}, headers={"Idempotency-Key": "once"}).status_code == 422


@pytest.mark.parametrize("ttl_s", [3600, 0])
def test_histories_expire_after_the_ttl(
    make_settings: Callable[..., Settings], private_redis: PrivateRedis, ttl_s: int
) -> None:
    with TestClient(create_app(make_settings(redis_url=private_redis.url, history_ttl_s=ttl_s))) as c:
        assert c.post("/users/tia/events", json={"items": [1]}).status_code == 200
    ttl = redis.Redis(port=private_redis.port).ttl(HISTORY_KEY.format("tia"))
    assert (ttl_s - 5 < ttl <= ttl_s) if ttl_s else ttl == -1  # -1: no expiry


def test_a_ttl_set_to_never_removes_the_expiry_an_earlier_setting_gave(
    make_settings: Callable[..., Settings], private_redis: PrivateRedis
) -> None:
    """ "0 = never": the next event of a history stored under a TTL took no expiry away, and the history expired."""
    for ttl_s in (3600, 0):
        with TestClient(create_app(make_settings(redis_url=private_redis.url, history_ttl_s=ttl_s))) as c:
            assert c.post("/users/tia/events", json={"items": [ttl_s % 7 + 1]}).status_code == 200
    assert redis.Redis(port=private_redis.port).ttl(HISTORY_KEY.format("tia")) == -1  # -1: no expiry


def test_in_process_histories_expire_after_the_ttl(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(history_ttl_s=1))) as c:
        assert c.post("/users/ned/events", json={"items": [1]}).status_code == 200
        assert c.get("/users/ned/history").status_code == 200
        time.sleep(1.1)
        assert c.get("/users/ned/history").status_code == 404


def test_in_process_histories_no_one_reads_again_are_dropped_when_they_expire() -> None:
    """Memory is bounded by the users active within the TTL: an expired history goes at the next write of
    anyone, not only when its own user is read again."""
    import asyncio

    from service.stores import MemoryStore

    async def scenario() -> MemoryStore:
        store = MemoryStore(max_history=10, max_cache_entries=10, history_ttl_s=1, idempotency_ttl_s=60)
        for user in ("a", "b", "c"):
            await store.append(user, ["1"])
        await asyncio.sleep(1.1)
        await store.append("d", ["3"])
        return store

    store = asyncio.run(scenario())
    assert list(store._histories) == ["d"]


def test_a_write_of_more_events_than_lua_can_unpack_is_stored(
    make_settings: Callable[..., Settings], private_redis: PrivateRedis
) -> None:
    """VSTAR_MAX_EVENTS may be raised: the script's one unpack of 8000 entries failed in Redis, which the store
    took for an outage (breaker open, the write sent again for a second), and answered 503 "may have been
    stored" for a write that was not."""
    settings = make_settings(redis_url=private_redis.url, max_events=10_000, stored_history_max=9000)
    with TestClient(create_app(settings)) as c:
        r = c.post("/users/many/events", json={"items": [1] * 8500})
        assert r.status_code == 200 and r.json() == {"user_id": "many", "appended": 8500, "history_length": 8500}
        assert c.post("/users/many/events", json={"items": [2] * 600}).json()["history_length"] == 9000
    entries = stored(private_redis, "many")
    assert entries == [b"1"] * 8400 + [b"2"] * 600


class ReplyCutter:
    """A TCP relay to Redis that runs the event-write script, then drops its reply, closes the connection and
    stops listening: Redis stored the events, the client saw the connection break, and every reconnect is
    refused (a Redis that went down right after the write ran)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.cut.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:  # the listener closed: connections are refused from now on
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.sockets += [client, upstream]
            write_sent = threading.Event()
            threading.Thread(target=self._to_redis, args=(client, upstream, write_sent), daemon=True).start()
            threading.Thread(target=self._to_client, args=(upstream, client, write_sent), daemon=True).start()

    def _to_redis(self, client: socket.socket, upstream: socket.socket, write_sent: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if b"EVALSHA" in data.upper():
                    write_sent.set()
                upstream.sendall(data)

    def _to_client(self, upstream: socket.socket, client: socket.socket, write_sent: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                if write_sent.is_set() and not self.cut.is_set():
                    self.cut.set()
                    self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept; connections are refused now
                    self.listener.close()
                    for s in self.sockets:  # every connection, pooled ones too, breaks at once (no timeout)
                        with contextlib.suppress(OSError):
                            s.shutdown(socket.SHUT_RDWR)
                    return
                client.sendall(data)


def test_a_write_whose_reply_was_lost_is_never_said_not_stored(
    make_settings: Callable[..., Settings], clean_redis: str
) -> None:
    """The write ran, its reply was lost with the connection, and Redis then refused connections: redis-py's
    own retry met the refusal, which the store took for a write never sent ("not stored, retry": a client
    following that advice without an Idempotency-Key stores the events twice). A write that was sent may have
    run, whatever refuses the copies after it."""
    server = redis.Redis.from_url(clean_redis)
    server.script_load(WRITE)  # no NOSCRIPT round trip: the first EVALSHA is the write
    cutter = ReplyCutter(upstream_port=6379)
    settings = make_settings(
        redis_url=f"redis://127.0.0.1:{cutter.port}/15", redis_retry_after_s=0.0, redis_write_settle_s=0.3
    )
    with TestClient(create_app(settings)) as c:
        r = c.post("/users/cut/events", json={"items": [7]})
    assert cutter.cut.is_set()
    assert server.lrange(HISTORY_KEY.format("cut"), 0, -1) == [b"7"]  # stored
    assert r.status_code == 503 and "may have been stored" in r.json()["error"]["message"], r.text


def test_a_write_on_a_connection_a_restart_closed_is_stored_and_leaves_the_breaker_closed(
    private_redis: PrivateRedis,
) -> None:
    """Event writes have no retry inside redis-py (above): the store sends the write again itself, at once, and
    a Redis that answered it is no outage (reads are not skipped after it)."""

    async def scenario() -> tuple[Appended, bool]:
        store = RedisStore(private_redis.url, 10, 0.25, 60.0, 0, 60, 1.0)
        await store.append("re", ["1"])  # a pooled connection, which the restart closes
        private_redis.stop()
        private_redis.start()
        done = await store.append("re", ["2"])
        reads = await store.history("re")  # the breaker (60 s) would refuse this
        await store.close()
        return done, reads == ["2"]

    done, read = asyncio.run(scenario())
    assert done == Appended(1, 1) and read
