"""``RedisStore``: the history store and response cache in Redis (``service.stores`` has the interface).

``redis.asyncio`` with two pools per process (one for event writes, below).
Histories are capped lists with a TTL, written by one Lua script (below); cache
entries are ``SET ... EX ttl``.
Event writes are exactly-once. A write carries an idempotency key
(the client's ``Idempotency-Key``, else one made for the request). One script,
atomic in Redis, appends the events and records ``fingerprint attempt appended
length`` under the key, or, if the key already has a record, appends nothing
and returns that record. So:

* a write Redis runs twice (the same request sent again, or a client's retry
  with the same key) stores once; the same key with other items is refused
  (``IdempotencyConflict``);
* a write that got no answer (a timeout: it may still be queued in a stalled
  Redis; a broken connection) is sent again, the same script with the same key,
  until Redis answers or ``settle_s`` has passed. Whichever copy runs first
  stores, the others replay its record, so an answer is always the truth: 200
  means stored once. A Redis that answers nothing that long leaves the outcome
  unknown (``WriteOutcomeUnknown``, a 503 that says the events may have been
  stored): a retry with the same ``Idempotency-Key`` is safe then, one without
  a key is not. A 503 that says "not stored" comes only when nothing was sent:
  the circuit breaker below was open, Redis refused the first connection
  (a Redis that is down), which fails at once instead of for ``settle_s``, or
  Redis answered the first copy with an error (``StoreRefused``: out of memory
  under ``maxmemory``, a read-only replica, a key of another type). Redis
  refuses those at the script's first write, its RPUSH (a script that has
  written is never refused for memory after), so nothing was stored.
* redis-py itself retries reads once on a connection error only, never on a
  timeout, and never retries a write: event writes go through a client of their
  own without that retry. Its copy sent after a broken connection could meet a
  refused reconnect (Redis went down right after running the first copy), which
  would read as a write never sent; here a refused connection is the first and
  only copy's, and every other failure is settled as above. A pooled
  connection a Redis restart closed breaks under the first copy: the store
  sends the write again at once and, if Redis answers, leaves the breaker
  closed, as redis-py's retry did.

Records of client keys live ``idempotency_ttl_s``; a request without a key
gets a record for ``OWN_KEY_TTL_S``, enough to settle its own write.

``append_after`` (``vstar load-histories``'s write) is the same exactly-once
write by a second script, ``WRITE_AFTER``, which places the entries by what the
caller read (its comment); ``POST /users/{id}/events`` runs ``WRITE`` alone.

Redis outage policy (a tested decision, see the README):

* every Redis error becomes ``StoreUnavailable``; callers decide what it means:
  cache reads count as misses and cache writes are skipped, a history read makes
  the request fall back to the history it carries (503 only when it carries
  none), and an event write is answered with 503, so no event is lost silently;
  ``vstar recommend --stored-history``'s read of many users (``histories``)
  stops the command, so an offline job never answers without them;
* after a failure the store stops calling Redis for ``redis_retry_after_s``
  (a small circuit breaker), so an outage costs requests nothing beyond that,
  then tries again: recovery needs no restart. An error Redis answered with
  (``StoreRefused``) is no outage and leaves the breaker closed: a Redis out of
  memory refuses writes but still serves the histories it holds;
* commands retry once on a connection error, which is what a pooled connection
  that died with the old Redis needs after Redis comes back.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar, cast

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from service.errors import IdempotencyConflict, StoreUnavailable
from service.json_logs import redact_urls
from service.stores import Appended, Store, StoreRefused, WriteOutcomeUnknown, fingerprint

log = logging.getLogger("service.stores")
T = TypeVar("T")
HISTORY_KEY = "vstar:history:{}"
CACHE_KEY = "vstar:cache:{}"
IDEMPOTENCY_KEY = "vstar:idem:{}:{}:{}"  # (length of the user id, user id, key): the record of a write


def idempotency_record(user_id: str, key: str) -> str:
    """The Redis key of the record of ``user_id``'s write under ``key``. The user id's length comes first, so
    that no two (user, key) pairs share a record: ("a", "b:c") and ("a:b", "c") would, joined by ':' alone."""
    return IDEMPOTENCY_KEY.format(len(user_id), user_id, key)


OWN_KEY_TTL_S = 60  # a request without Idempotency-Key: long enough to settle its own write

# KEYS: history, record; ARGV: fingerprint, attempt, max history, history TTL (0: none, and an expiry set under an
# earlier TTL is removed: "0 = never" holds for histories stored before the setting changed), record TTL, entries...
# Returns {"stored", record} or {"replayed", record} (an earlier run under the same key). The entries are pushed
# 1000 at a time: Lua's unpack refuses more than about 8000 values ("too many results to unpack").
WRITE = """
local record = redis.call('GET', KEYS[2])
if record then return {'replayed', record} end
for i = 6, #ARGV, 1000 do redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV))) end
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
if tonumber(ARGV[4]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[4]) else redis.call('PERSIST', KEYS[1]) end
record = ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. (#ARGV - 5) .. ' ' .. redis.call('LLEN', KEYS[1])
redis.call('SET', KEYS[2], record, 'EX', ARGV[5])
return {'stored', record}
"""
# ``append_after`` (``vstar load-histories``): WRITE with two more ARGV before the entries, the count of the
# entries the caller read and the SHA-1 of them joined by 0x1f. Read none: the entries go before the whole list
# (LPUSH, each chunk reversed), all of which came after the read. Read some: pushed after them only if the list's
# last max history are still them, else {"changed", length} and nothing written (and no record: a copy sent
# again finds the same).
WRITE_AFTER = """
local record = redis.call('GET', KEYS[2])
if record then return {'replayed', record} end
if tonumber(ARGV[6]) > 0 then
  local held = redis.call('LRANGE', KEYS[1], -tonumber(ARGV[3]), -1)
  if #held ~= tonumber(ARGV[6]) or redis.sha1hex(table.concat(held, string.char(31))) ~= ARGV[7] then
    return {'changed', tostring(redis.call('LLEN', KEYS[1]))}
  end
  for i = 8, #ARGV, 1000 do redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV))) end
else
  for last = #ARGV, 8, -1000 do
    local chunk = {}
    for i = last, math.max(last - 999, 8), -1 do chunk[#chunk + 1] = ARGV[i] end
    redis.call('LPUSH', KEYS[1], unpack(chunk))
  end
end
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
if tonumber(ARGV[4]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[4]) else redis.call('PERSIST', KEYS[1]) end
record = ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. (#ARGV - 7) .. ' ' .. redis.call('LLEN', KEYS[1])
redis.call('SET', KEYS[2], record, 'EX', ARGV[5])
return {'stored', record}
"""

# ``delete_history``: the count and the delete in one step, so the count is what went. A script, not MULTI/EXEC:
# over maxmemory Redis refuses every command queued in a transaction, DEL too, so the history could not be
# forgotten (nor its memory freed) until keys expired; a script is refused only at a command that takes memory.
# A value of another type under the key (no entries): -1, and DEL still runs.
DELETE = """
local held = redis.pcall('LLEN', KEYS[1])
redis.call('DEL', KEYS[1])
if type(held) == 'table' then return -1 end
return held
"""


def read_digest(read: Sequence[str]) -> str:
    """What ``WRITE_AFTER`` compares the stored history with: the SHA-1 of the entries read, joined by 0x1f."""
    return hashlib.sha1("\x1f".join(read).encode()).hexdigest()


def _refused(error: BaseException) -> bool:
    """Redis refused the connection (redis-py raises ``ConnectionError`` from the ``ConnectionRefusedError``):
    the command was never sent, unlike a timeout or a connection broken after sending."""
    return isinstance(error, ConnectionRefusedError) or isinstance(error.__cause__, ConnectionRefusedError)


class RedisStore(Store):
    kind = "redis"

    def __init__(
        self,
        url: str,
        max_history: int,
        timeout_s: float,
        retry_after_s: float,
        history_ttl_s: int,
        idempotency_ttl_s: int,
        settle_s: float,
    ) -> None:
        self.max_history = max_history
        self.retry_after_s = retry_after_s
        self.history_ttl_s = history_ttl_s
        self.idempotency_ttl_s = idempotency_ttl_s
        self.settle_s = settle_s
        self._redis = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # a pooled connection that died with the old Redis; never a timeout: the command may be queued
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        # event writes: no retry inside redis-py, so a refused connection means this copy was never sent (above)
        self._writer = Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
        )
        self._write = self._writer.register_script(WRITE)
        self._write_after = self._writer.register_script(WRITE_AFTER)
        self._delete = self._redis.register_script(DELETE)  # a retried delete is the same delete: the reads' client
        self._down_until = 0.0  # monotonic time before which Redis is not tried
        self._healthy = True
        self._refusing: str | None = None  # the last error Redis answered with, until a command succeeds
        self.tls = url.startswith("rediss://")
        self.where = redact_urls(url)

    async def _call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        if time.monotonic() < self._down_until:
            raise StoreUnavailable(f"Redis is unavailable ({what}); retrying in under {self.retry_after_s:g} s")
        try:
            result = await op()
        except ResponseError as e:
            raise self._refusal(what, e) from e
        except (TimeoutError, RedisError, OSError) as e:
            self._failed(what, e)
            raise StoreUnavailable(f"Redis is unavailable ({what})") from e
        self._answered(what)
        return result

    def _failed(self, what: str, error: BaseException) -> None:
        self._down_until = time.monotonic() + self.retry_after_s
        if self._healthy:
            log.warning("redis unavailable", extra={"op": what, "error": repr(error)})
        self._healthy = False

    def _refusal(self, what: str, error: ResponseError) -> StoreRefused:
        """Redis is up and said no: logged once per distinct reason, the breaker left as it is."""
        reason = f"{type(error).__name__}: {error}"  # redis-py keeps Redis's error code in the class (OOM ...)
        if reason != self._refusing:
            log.warning("redis refused a command", extra={"op": what, "error": repr(error)})
        self._refusing = reason
        return StoreRefused(what, reason)

    def _answered(self, what: str) -> None:
        if not self._healthy:
            log.info("redis reachable again", extra={"op": what})
        self._healthy = True
        self._refusing = None

    async def history(self, user_id: str) -> list[str]:
        # the client is built without decode_responses: replies are bytes (its typing admits str too)
        raw = await self._call(
            "read history",
            # the last max_history: a history stored under a higher VSTAR_STORED_HISTORY_MAX is read under today's
            lambda: cast(
                "Awaitable[list[bytes]]", self._redis.lrange(HISTORY_KEY.format(user_id), -self.max_history, -1)
            ),
        )
        return [r.decode(errors="replace") for r in raw]  # an entry another writer left undecodable: skipped as unknown

    async def histories(self, user_ids: Sequence[str]) -> list[list[str]]:
        """One pipeline of the reads ``history`` makes (one round trip, not a transaction: each read is atomic,
        as each request's is); a failure of any is the call's."""

        async def read() -> list[list[bytes]]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for user_id in user_ids:
                    pipe.lrange(HISTORY_KEY.format(user_id), -self.max_history, -1)
                return cast("list[list[bytes]]", await pipe.execute())

        raw = await self._call("read histories", read)
        return [[r.decode(errors="replace") for r in entries] for entries in raw]

    async def append(self, user_id: str, entries: Sequence[str], idempotency_key: str | None = None) -> Appended:
        record_key = idempotency_record(user_id, idempotency_key or f"own-{uuid.uuid4().hex}")
        ttl = self.idempotency_ttl_s if idempotency_key is not None else OWN_KEY_TTL_S
        return await self._run(self._write, user_id, record_key, entries, ttl, [])

    async def append_after(
        self, user_id: str, entries: Sequence[str], read: Sequence[str], idempotency_key: str
    ) -> Appended:
        record_key = idempotency_record(user_id, idempotency_key)
        return await self._run(
            self._write_after, user_id, record_key, entries, self.idempotency_ttl_s, [len(read), read_digest(read)]
        )

    async def _run(
        self,
        script: AsyncScript,
        user_id: str,
        record_key: str,
        entries: Sequence[str],
        record_ttl_s: int,
        extra: list[str | int],
    ) -> Appended:
        """One write script, exactly once (module docstring): ARGV fingerprint, attempt, max history, history
        TTL, record TTL, ``extra``, entries."""
        if time.monotonic() < self._down_until:
            raise StoreUnavailable(f"Redis is unavailable (append history); retrying in under {self.retry_after_s:g} s")
        attempt = uuid.uuid4().hex[:16]
        fp = fingerprint(user_id, entries)
        args: list[str | int] = [fp, attempt, self.max_history, self.history_ttl_s, record_ttl_s, *extra, *entries]
        keys = [HISTORY_KEY.format(user_id), record_key]
        try:
            reply = await script(keys=keys, args=args)
        except ResponseError as e:  # the script failed at or before its first write: nothing was stored
            raise self._refusal("append history", e) from e
        except (TimeoutError, RedisError, OSError) as e:
            if _refused(e):  # no connection, so nothing was sent (redis-py sends no copy of its own): not run
                self._failed("append history", e)
                raise StoreUnavailable("Redis refused the connection (append history)") from e
            if not isinstance(e, RedisConnectionError):  # no answer in time: skip Redis while this one settles
                self._failed("append history", e)
            # a broken connection (a restart closed a pooled one): sent again at once, the breaker left closed
            reply = await self._send_again(script, keys, args)
        else:
            self._answered("append history")
        if reply[0] == b"changed":
            return Appended(0, int(reply[1]), changed=True)
        return self._appended(reply[1], fp, attempt)

    async def _send_again(self, script: AsyncScript, keys: list[str], args: list[str | int]) -> list[bytes]:
        """The same write until Redis answers one copy (it runs once, see above), or ``WriteOutcomeUnknown``."""
        give_up = time.monotonic() + self.settle_s
        while True:
            try:
                reply: list[bytes] = await script(keys=keys, args=args)
                return reply
            except (TimeoutError, RedisError, OSError) as e:
                if time.monotonic() >= give_up:
                    self._failed("append history", e)
                    raise WriteOutcomeUnknown("Redis did not answer whether the write ran (append history)") from e
                await asyncio.sleep(0.05)  # a refused connection fails at once; do not spin on it

    @staticmethod
    def _appended(record: bytes, fp: str, attempt: str) -> Appended:
        stored_fp, stored_attempt, appended, length = record.decode().split(" ")
        if stored_fp != fp:
            raise IdempotencyConflict()
        return Appended(int(appended), int(length), replayed=stored_attempt != attempt)

    async def delete_history(self, user_id: str) -> int:
        key = HISTORY_KEY.format(user_id)

        async def delete() -> int:
            held = int(await self._delete(keys=[key]))
            if held < 0:  # a value of another type under the key (no entries): DEL ran
                log.warning("a history key held another type; deleted", extra={"key": key})
                return 0
            return held

        return await self._call("delete history", delete)

    async def cache_get(self, key: str) -> bytes | None:
        return await self._call(
            "read cache", lambda: cast("Awaitable[bytes | None]", self._redis.get(CACHE_KEY.format(key)))
        )

    async def cache_set(self, key: str, value: bytes, ttl_s: int) -> None:
        await self._call("write cache", lambda: self._redis.set(CACHE_KEY.format(key), value, ex=ttl_s))

    async def ping(self) -> bool:
        """Always asks Redis, so readiness sees recovery at once; the breaker stays as it is while the ping waits
        (requests meanwhile still skip a Redis that failed) and closes only when Redis has answered."""
        try:
            await self._redis.ping()
        except (TimeoutError, RedisError, OSError) as e:
            self._failed("ping", e)
            # Redis answered and refused the URL's database or credentials: a setting to fix, not an outage
            self.refusal = f"{type(e).__name__}: {e}" if isinstance(e, ResponseError | AuthenticationError) else None
            return False
        self.refusal = None
        self._down_until = 0.0
        self._answered("ping")
        return True

    def describe(self) -> str:
        return f"Redis at {self.where}"

    def unreachable_hint(self) -> str | None:
        """A ``rediss://`` URL sent to a port without TLS waits for the TLS handshake until the timeout, as a
        stalled server does (the handshake's bytes are no Redis command to answer)."""
        if self.tls:
            return "REDIS_URL asks for TLS (rediss://): a port that does not speak TLS never answers its handshake"
        return None

    async def close(self) -> None:
        await self._redis.aclose()
        await self._writer.aclose()
