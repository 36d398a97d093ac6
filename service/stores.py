"""User histories and the response cache, behind one interface with two backends.

* ``MemoryStore``: in-process dicts; the embedded default without ``REDIS_URL``.
  Each worker process has its own, which is fine for one worker and for tests.
* ``RedisStore``: ``redis.asyncio`` with one pool per process. Histories are
  capped lists (``RPUSH`` + ``LTRIM`` in one transaction); cache entries are
  ``SET ... EX ttl``.

Redis outage policy (a tested decision, see the README):

* every Redis error becomes ``StoreUnavailable``; callers decide what it means:
  cache reads count as misses and cache writes are skipped, a history read makes
  the request fall back to the history it carries (503 only when it carries
  none), and an event write is answered with 503, so no event is lost silently;
* after a failure the store stops calling Redis for ``redis_retry_after_s``
  (a small circuit breaker), so an outage costs requests nothing beyond that,
  then tries again: recovery needs no restart;
* commands retry once on a connection error, which is what a pooled connection
  that died with the old Redis needs after Redis comes back.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from service.errors import StoreUnavailable

log = logging.getLogger("service.stores")
T = TypeVar("T")
HISTORY_KEY = "vstar:history:{}"
CACHE_KEY = "vstar:cache:{}"


class Store(abc.ABC):
    """Histories (lists of normalised entries, oldest first) and cached response bodies."""

    kind: str

    @abc.abstractmethod
    async def history(self, user_id: str) -> list[str]:
        """The stored entries, oldest first; empty for an unknown user."""

    @abc.abstractmethod
    async def append(self, user_id: str, entries: Sequence[str]) -> int:
        """Append entries and return the stored length after trimming."""

    @abc.abstractmethod
    async def cache_get(self, key: str) -> bytes | None: ...

    @abc.abstractmethod
    async def cache_set(self, key: str, value: bytes, ttl_s: int) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> bool:
        """True when the backend answers now (always true in process)."""

    async def close(self) -> None:
        return None


class MemoryStore(Store):
    kind = "memory"

    def __init__(self, max_history: int, max_cache_entries: int) -> None:
        self.max_history = max_history
        self.max_cache_entries = max_cache_entries
        self._histories: dict[str, list[str]] = {}
        self._cache: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # key -> (expiry, body), LRU order

    async def history(self, user_id: str) -> list[str]:
        return list(self._histories.get(user_id, ()))

    async def append(self, user_id: str, entries: Sequence[str]) -> int:
        stored = (self._histories.get(user_id, []) + list(entries))[-self.max_history :]
        self._histories[user_id] = stored
        return len(stored)

    async def cache_get(self, key: str) -> bytes | None:
        hit = self._cache.get(key)
        if hit is None:
            return None
        expiry, body = hit
        if expiry < time.monotonic():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return body

    async def cache_set(self, key: str, value: bytes, ttl_s: int) -> None:
        self._cache[key] = (time.monotonic() + ttl_s, value)
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_cache_entries:
            self._cache.popitem(last=False)

    async def ping(self) -> bool:
        return True


class RedisStore(Store):
    kind = "redis"

    def __init__(self, url: str, max_history: int, timeout_s: float, retry_after_s: float) -> None:
        self.max_history = max_history
        self.retry_after_s = retry_after_s
        self._redis = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
        )
        self._down_until = 0.0  # monotonic time before which Redis is not tried
        self._healthy = True

    async def _call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        if time.monotonic() < self._down_until:
            raise StoreUnavailable(f"Redis is unavailable ({what}); retrying in under {self.retry_after_s:g} s")
        try:
            result = await op()
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            self._down_until = time.monotonic() + self.retry_after_s
            if self._healthy:
                log.warning("redis unavailable", extra={"op": what, "error": repr(e)})
            self._healthy = False
            raise StoreUnavailable(f"Redis is unavailable ({what})") from e
        if not self._healthy:
            log.info("redis reachable again", extra={"op": what})
        self._healthy = True
        return result

    async def history(self, user_id: str) -> list[str]:
        raw = await self._call("read history", lambda: self._redis.lrange(HISTORY_KEY.format(user_id), 0, -1))
        return [r.decode() for r in raw]

    async def append(self, user_id: str, entries: Sequence[str]) -> int:
        key = HISTORY_KEY.format(user_id)

        async def write() -> int:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.rpush(key, *entries)
                pipe.ltrim(key, -self.max_history, -1)
                pipe.llen(key)
                _, _, length = await pipe.execute()
            return int(length)

        return await self._call("append history", write)

    async def cache_get(self, key: str) -> bytes | None:
        return await self._call("read cache", lambda: self._redis.get(CACHE_KEY.format(key)))

    async def cache_set(self, key: str, value: bytes, ttl_s: int) -> None:
        await self._call("write cache", lambda: self._redis.set(CACHE_KEY.format(key), value, ex=ttl_s))

    async def ping(self) -> bool:
        """Always asks Redis (the breaker does not apply), so readiness sees recovery at once."""
        self._down_until = 0.0
        try:
            await self._call("ping", self._redis.ping)
        except StoreUnavailable:
            return False
        return True

    async def close(self) -> None:
        await self._redis.aclose()
