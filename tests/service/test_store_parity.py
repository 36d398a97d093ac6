"""The in-process store and the Redis store answer every call sequence alike (``service.stores``).

Random sequences of appends (with and without an ``Idempotency-Key``, keys
shared across users, more entries than the cap), ``append_after`` writes (after
the history just read, after nothing, after a history that is no longer the
stored one), history reads (one user's,
or several users' at once), history deletes and cache
writes and reads run on a ``MemoryStore`` and on a ``RedisStore`` over the
real Redis; results, conflicts included, must be equal.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.errors import IdempotencyConflict
from service.redis_store import RedisStore
from service.stores import MemoryStore, Store

USERS = st.sampled_from(["a", "b", "a:b"])  # "a" with key "b:c" and "a:b" with key "c" must stay apart
ENTRIES = st.lists(st.sampled_from(["1", "2", "3", "<a_1><b_2><c_3>"]), min_size=1, max_size=5)
KEYS_GIVEN = st.sampled_from(["k1", "k2", "b:c", "c"])
KEYS = st.none() | KEYS_GIVEN
READS = {"none": [], "stale": ["1", "1"]}  # else "now": the user's history read just before
OPS = st.lists(
    st.tuples(st.just("append"), USERS, ENTRIES, KEYS)
    | st.tuples(st.just("append_after"), USERS, ENTRIES, st.sampled_from(["now", "none", "stale"]), KEYS_GIVEN)
    | st.tuples(st.just("history"), USERS)
    | st.tuples(st.just("delete_history"), USERS)
    | st.tuples(st.just("histories"), st.lists(USERS, max_size=4))
    | st.tuples(st.just("cache_set"), st.sampled_from(["x", "y"]), st.binary(max_size=4))
    | st.tuples(st.just("cache_get"), st.sampled_from(["x", "y"])),
    max_size=12,
)


async def run(store: Store, ops: list[tuple[Any, ...]]) -> list[object]:
    out: list[object] = []
    for name, *args in ops:
        try:
            if name == "append":
                out.append(await store.append(*args))
            elif name == "append_after":
                user_id, entries, read, key = args
                seen = await store.history(user_id) if read == "now" else READS[read]
                out.append(await store.append_after(user_id, entries, seen, key))
            elif name == "history":
                out.append(await store.history(*args))
            elif name == "delete_history":
                out.append(await store.delete_history(*args))
            elif name == "histories":  # Redis: one pipeline of the reads, as vstar recommend --stored-history makes
                out.append(await store.histories(*args))
            elif name == "cache_set":
                out.append(await store.cache_set(*args, ttl_s=60))
            else:
                out.append(await store.cache_get(*args))
        except IdempotencyConflict as e:
            out.append(("conflict", e.message))
    await store.close()
    return out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, cap=st.integers(1, 4))
def test_memory_and_redis_stores_answer_alike(clean_redis: str, ops: list[tuple[Any, ...]], cap: int) -> None:
    redis.Redis.from_url(clean_redis).flushdb()
    memory = asyncio.run(run(MemoryStore(cap, 100, 3600, 3600), ops))
    in_redis = asyncio.run(run(RedisStore(clean_redis, cap, 1.0, 1.0, 3600, 3600, 1.0), ops))
    assert memory == in_redis


def test_a_lower_cap_holds_for_a_history_stored_under_a_higher_one(clean_redis: str) -> None:
    """``VSTAR_STORED_HISTORY_MAX`` lowered across a restart: a history Redis kept under the old cap is read as
    its last items under the new one (it was read whole until the user's next event trimmed it), as a write
    would keep them."""

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        wide = RedisStore(clean_redis, 5, 1.0, 1.0, 3600, 3600, 1.0)
        await wide.append("u", ["a", "b", "c", "d", "e"])
        narrow = RedisStore(clean_redis, 3, 1.0, 1.0, 3600, 3600, 1.0)
        try:
            before = await narrow.history("u")
            await narrow.append("u", ["f"])
            return before, await narrow.history("u"), await wide.history("u")
        finally:
            await wide.close()
            await narrow.close()

    redis.Redis.from_url(clean_redis).flushdb()
    assert asyncio.run(scenario()) == (["c", "d", "e"], ["d", "e", "f"], ["d", "e", "f"])


def test_append_after_keeps_the_order_past_what_lua_can_unpack(clean_redis: str) -> None:
    """``WRITE_AFTER`` pushes 1000 entries at a time (LPUSH, each chunk reversed, when it puts them first)."""
    entries = [str(i) for i in range(2500)]

    async def scenario(store: Store) -> tuple[list[str], list[str]]:
        try:
            await store.append("new", ["live"])
            await store.append_after("new", entries, [], "load")
            await store.append("old", ["kept"])
            await store.append_after("old", entries, ["kept"], "load")
            return await store.history("new"), await store.history("old")
        finally:
            await store.close()

    redis.Redis.from_url(clean_redis).flushdb()
    expected = ([*entries, "live"], ["kept", *entries])
    assert asyncio.run(scenario(MemoryStore(3000, 100, 3600, 3600))) == expected
    assert asyncio.run(scenario(RedisStore(clean_redis, 3000, 1.0, 1.0, 3600, 3600, 1.0))) == expected
