"""Redis outage and recovery, against a private redis-server this test stops and starts.

The decision under test (see service/redis_store.py): with Redis down the service
keeps answering requests that carry a history, answers 503 where the stored
history or an event write is needed, reports "degraded" on /readyz (still 200,
so a shared-Redis outage does not take every replica out of rotation), and
recovers without a restart once Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.errors import StoreUnavailable
from service.redis_store import RedisStore
from service.settings import Settings
from tests.service.conftest import PrivateRedis, wait_until


class RedisServer(Protocol):
    """The ``private_redis`` fixture: a redis-server this test may stop and start."""

    url: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


def test_outage_and_recovery(make_settings: Callable[..., Settings], private_redis: RedisServer) -> None:
    settings = make_settings(redis_url=private_redis.url, redis_retry_after_s=0.1, redis_timeout_s=0.2)
    app = create_app(settings)
    with TestClient(app) as c:
        assert c.post("/users/erin/events", json={"items": [1, 2]}).status_code == 200
        assert c.post("/recommend", json={"user_id": "erin", "k": 3}).json()["stored_history"] == "used"
        errors = app.state.recommender.metrics.registry.get_sample_value
        assert errors("vstar_store_errors_total", {"op": "read_history"}) is None  # no error counted yet

        private_redis.stop()
        r = c.post("/recommend", json={"history": [1, 2], "k": 3})
        assert r.status_code == 200 and r.json()["stored_history"] == "none" and len(r.json()["items"]) == 3
        r = c.post("/recommend", json={"user_id": "erin", "history": [3], "k": 3})
        assert r.status_code == 200 and r.json()["stored_history"] == "unavailable" and r.json()["history_length"] == 1
        r = c.post("/recommend", json={"user_id": "erin", "k": 3})
        assert r.status_code == 503 and r.json()["error"]["type"] == "store_unavailable"
        assert r.json()["error"]["message"].startswith("user_id:")
        r = c.post("/recommend", json={"user_id": "erin", "exclude_items": ["<a_1>"], "k": 3})
        assert r.status_code == 422 and "exclude_items" in r.text  # a bad request says so, Redis or not
        r = c.post("/users/erin/events", json={"items": [4]})
        assert r.status_code == 503 and r.json()["error"]["type"] == "store_unavailable"
        assert r.headers["retry-after"] == "1"
        assert c.get("/users/erin/history").status_code == 503
        r = c.delete("/users/erin/history")
        assert r.status_code == 503 and r.json()["error"]["message"].endswith("retry (a delete is safe to repeat)")
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json() | {"model_version": None} == {
            "status": "degraded",
            "model": "loaded",
            "model_version": None,
            "redis": "unreachable",
        }
        assert c.get("/healthz").status_code == 200
        for op in ("read_history", "append_history", "delete_history"):  # each failed call counted
            assert (errors("vstar_store_errors_total", {"op": op}) or 0.0) > 0, op
        assert 'vstar_store_errors_total{op="read_history"}' in c.get("/metrics").text

        private_redis.start()  # same port, empty data (no persistence): recovery, not durability
        assert wait_until(lambda: c.get("/readyz").json()["status"] == "ready")
        assert wait_until(lambda: c.post("/users/erin/events", json={"items": [5]}).status_code == 200)
        assert c.get("/users/erin/history").json()["history"][-1]["item_id"] == 5
        assert c.post("/recommend", json={"user_id": "erin", "k": 3}).status_code == 200


def test_starts_degraded_when_redis_is_down(make_settings: Callable[..., Settings], dead_redis_url: str) -> None:
    with TestClient(create_app(make_settings(redis_url=dead_redis_url, redis_retry_after_s=0.05))) as c:
        assert c.get("/readyz").json()["status"] == "degraded"
        t0 = time.perf_counter()
        for _ in range(5):
            r = c.post("/recommend", json={"user_id": "zed", "history": [8, 9], "k": 2})
            assert r.status_code == 200 and r.json()["stored_history"] == "unavailable"
        assert time.perf_counter() - t0 < 5  # refused connections fail fast; no hang per request
        assert c.post("/users/zed/events", json={"items": [1]}).status_code == 503


def test_a_tls_url_to_a_port_without_tls_says_so_at_startup(
    make_settings: Callable[..., Settings], private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """rediss:// to a plain Redis waits out the TLS handshake like a stalled server: the warning names TLS."""
    url = private_redis.url.replace("redis://", "rediss://")
    with caplog.at_level(logging.WARNING), TestClient(create_app(make_settings(redis_url=url))) as c:
        assert c.get("/readyz").json()["redis"] == "unreachable"
    warned = [r.getMessage() for r in caplog.records if "unreachable at startup" in r.getMessage()]
    assert len(warned) == 1 and "asks for TLS (rediss://)" in warned[0], warned
    with caplog.at_level(logging.WARNING), TestClient(create_app(make_settings(redis_url=private_redis.url))):
        pass
    assert len([r for r in caplog.records if "unreachable at startup" in r.getMessage()]) == 1


def test_readiness_probes_do_not_lift_the_circuit_breaker(private_redis: PrivateRedis) -> None:
    """While a /readyz ping waits on a stalled Redis, requests still skip Redis instead of each paying a timeout."""

    async def scenario() -> None:
        store = RedisStore(
            private_redis.url,
            10,
            timeout_s=0.25,
            retry_after_s=5.0,
            history_ttl_s=0,
            idempotency_ttl_s=60,
            settle_s=0.5,
        )
        sleeper = private_redis.stall(1.5)
        with pytest.raises(StoreUnavailable):
            await store.history("amy")  # times out: the breaker opens
        probe = asyncio.ensure_future(store.ping())
        await asyncio.sleep(0.05)  # the ping is waiting on Redis
        with pytest.raises(StoreUnavailable, match="retrying in under"):  # the breaker's answer: Redis not asked
            await store.history("amy")
        assert await probe is False
        sleeper.join()
        assert await store.ping() is True  # Redis is back: the ping sees it at once and closes the breaker
        assert await store.history("amy") == []
        await store.close()

    asyncio.run(scenario())


def test_a_stalled_redis_does_not_hold_a_ved_request_past_its_cap(
    make_settings: Callable[..., Settings], private_redis: PrivateRedis
) -> None:
    """The store calls of a VED request (stored history, cache read and write) end at its last chance: a Redis
    that stalls longer than the cap, with a socket timeout longer still, leaves the cap to hold."""
    settings = make_settings(redis_url=private_redis.url, redis_timeout_s=5.0)
    with TestClient(create_app(settings)) as c:
        assert c.post("/users/erin/events", json={"items": [1, 2]}).status_code == 200
        sleeper = private_redis.stall(2.0)
        r = c.post("/recommend", json={"user_id": "erin", "history": [3], "k": 3, "mode": "ved", "latency_ms": 100})
        sleeper.join()
        # the stall (2 s) is shorter than the store's timeout (5 s): a request that waited for Redis would have used
        # the stored history; before, it did
        assert r.status_code == 200 and r.json()["stored_history"] == "unavailable", r.text
        r = c.post("/recommend", json={"user_id": "erin", "k": 3, "mode": "ved"})  # Redis is back
        assert r.status_code == 200 and r.json()["stored_history"] == "used"


def test_a_stalled_redis_leaves_a_ved_request_its_search_and_opens_the_breaker(
    make_settings: Callable[..., Settings], private_redis: PrivateRedis
) -> None:
    """A Redis that takes connections and answers nothing: a VED request's store reads give up at a share of its
    cap, so its search still runs (before, the cache read took the whole cap and every answer was the
    popularity list); the read runs on to the store's own timeout, which counts the error and opens the breaker."""
    # the store's timeout is longer than the cap: before, the read ran to the cap, and the answer was the popular list
    settings = make_settings(redis_url=private_redis.url, redis_timeout_s=1.0, redis_retry_after_s=5.0)
    request = {"user_id": "erin", "history": [3, 4], "k": 3, "mode": "ved", "latency_ms": 1000}
    with TestClient(create_app(settings)) as c:
        sleeper = private_redis.stall(3.0)
        r = c.post("/recommend", json=request)
        assert r.status_code == 200 and r.json()["stored_history"] == "unavailable", r.text
        assert r.json()["search"]["fallback"] != "popular" and r.json()["search"]["tokens_spent"] > 0, r.text
        time.sleep(1.0)  # the given-up read reaches the store's timeout
        errors = [line for line in c.get("/metrics").text.splitlines() if line.startswith("vstar_store_errors_total")]
        assert any('op="read_history"' in line and not line.endswith(" 0.0") for line in errors), errors
        started = time.perf_counter()  # the breaker is open: Redis is skipped, not waited for (a beam request
        r = c.post("/recommend", json={"user_id": "erin", "history": [3, 4], "k": 3})  # would wait the store's 1 s)
        assert r.status_code == 200 and r.json()["stored_history"] == "unavailable", r.text
        assert time.perf_counter() - started < 0.5
        sleeper.join()


def test_a_store_call_given_up_on_is_cancelled_at_shutdown(
    make_settings: Callable[..., Settings], private_redis: PrivateRedis
) -> None:
    """A VED request left its read to a stalled Redis with a long timeout; shutting down cancels that call rather
    than leaving it pending past the loop."""
    settings = make_settings(redis_url=private_redis.url, redis_timeout_s=5.0)
    app = create_app(settings)
    with TestClient(app) as c:
        assert c.post("/recommend", json={"history": [5], "k": 3, "mode": "ved"}).status_code == 200  # warm
        sleeper = private_redis.stall(3.0)  # still asleep at shutdown, however slowly the request was answered
        r = c.post("/recommend", json={"history": [3, 4], "k": 3, "mode": "ved", "latency_ms": 1000})
        assert r.status_code == 200 and r.json()["search"]["fallback"] != "popular", r.text
        recommender = app.state.recommender
        given_up = set(recommender.store_calls.given_up)
        assert given_up  # the cache read runs on, up to its 5 s timeout
    assert all(task.cancelled() for task in given_up) and not recommender.store_calls.given_up
    sleeper.join()


def test_a_write_redis_refuses_is_answered_at_once_as_not_stored_and_reads_go_on(
    make_settings: Callable[..., Settings], private_redis: PrivateRedis
) -> None:
    """Redis out of memory (``maxmemory``) answers the write's script with an error at its first write: the
    events were not stored, which the 503 says at once (not after the settle time, as "may have been
    stored"), and the breaker stays closed, so the stored histories are still read."""
    settings = make_settings(redis_url=private_redis.url, redis_retry_after_s=30.0, redis_write_settle_s=5.0)
    admin = redis.Redis(port=private_redis.port)
    with TestClient(create_app(settings)) as c:
        assert c.post("/users/erin/events", json={"items": [1, 2]}).status_code == 200
        admin.config_set("maxmemory", 1)
        r = c.post("/users/erin/events", json={"items": [3]})  # sent again until settled, it would say "may have been"
        message = r.json()["error"]["message"]
        assert r.status_code == 503 and "refused the write (OutOfMemoryError" in message, message
        assert message.endswith("the events were not stored")
        assert [e["item_id"] for e in c.get("/users/erin/history").json()["history"]] == [1, 2]
        assert c.post("/recommend", json={"user_id": "erin", "k": 3}).json()["stored_history"] == "used"
        # a request to be forgotten still is: MULTI/EXEC had Redis refuse its DEL too while over maxmemory
        forgotten = c.delete("/users/erin/history")
        assert forgotten.status_code == 200 and forgotten.json()["deleted"] == 2, forgotten.text
        admin.config_set("maxmemory", 0)
        assert c.post("/users/erin/events", json={"items": [3]}).status_code == 200
        assert [e["item_id"] for e in c.get("/users/erin/history").json()["history"]] == [3]
