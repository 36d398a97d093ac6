"""User histories and the response cache, behind one interface with two backends.

* ``MemoryStore``: in-process dicts; the embedded default without ``REDIS_URL``.
  Each worker process has its own, which is fine for one worker and for tests.
* ``RedisStore`` (``service.redis_store``): ``redis.asyncio``; histories are
  capped lists with a TTL, event writes exactly-once under an idempotency key,
  and its outage policy, all described there.

What every backend promises (``Store``): ``history`` oldest first, empty for an
unknown user; ``append`` once per idempotency key (``IdempotencyConflict`` when
the key stored other entries; ``Appended.replayed`` when it stored these before);
``append_after`` likewise, placed after what an earlier read returned and before
whatever was stored since, or not at all (``Appended.changed``): the write of
``vstar load-histories``, whose older timeline must never land after a user's
live events (``service.load_histories``); ``histories`` as many ``history``
calls; errors as ``StoreUnavailable`` (a write that may have run:
``WriteOutcomeUnknown``; a command the backend refused, which did not run:
``StoreRefused``), which callers turn into what they mean: cache
reads count as misses and cache writes are skipped, a history read makes the
request fall back to the history it carries (503 only when it carries none), an
event write is answered with 503, so no event is lost silently, and
``vstar recommend --stored-history``'s read of many users stops the command, so
an offline job never answers without them.
"""

from __future__ import annotations

import abc
import hashlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm

from service.errors import IdempotencyConflict, StoreUnavailable

HISTORIES_CHUNK = 1000  # users per ``Store.histories`` call of ``read_histories`` (one Redis pipeline)


class WriteOutcomeUnknown(StoreUnavailable):
    """A write got no answer, nor did the copies sent after it: it may or may not have run."""


class StoreRefused(StoreUnavailable):
    """Redis answered the command with an error (``reason``, Redis's words): the command did not run."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"Redis refused the command ({what}): {reason}")
        self.reason = reason


@dataclass(frozen=True)
class Appended:
    appended: int  # events the write (or the key's earlier one) stored
    history_length: int  # stored length right after that write
    replayed: bool = False  # an earlier request with this Idempotency-Key stored them; nothing was appended now
    changed: bool = False  # append_after: the history is no longer what was read; nothing was stored


def fingerprint(user_id: str, entries: Sequence[str]) -> str:
    """What an idempotency key promises: this user, these entries in this order."""
    return hashlib.sha256("\x1f".join([user_id, *entries]).encode()).hexdigest()[:32]


class Store(abc.ABC):
    """Histories (lists of normalised entries, oldest first) and cached response bodies."""

    kind: str
    refusal: str | None = None  # why the backend's last ping was refused by it (a setting to fix), if it was

    @abc.abstractmethod
    async def history(self, user_id: str) -> list[str]:
        """The stored entries, oldest first; empty for an unknown user."""

    async def histories(self, user_ids: Sequence[str]) -> list[list[str]]:
        """Each user's stored entries as ``history`` reads them, in ``user_ids``' order: one call for them all
        where the backend can (``vstar recommend --stored-history`` reads a file's users up front)."""
        return [await self.history(user_id) for user_id in user_ids]

    @abc.abstractmethod
    async def append(self, user_id: str, entries: Sequence[str], idempotency_key: str | None = None) -> Appended:
        """Append entries once per idempotency key; ``IdempotencyConflict`` if the key stored other entries."""

    @abc.abstractmethod
    async def append_after(
        self, user_id: str, entries: Sequence[str], read: Sequence[str], idempotency_key: str
    ) -> Appended:
        """``append``, but ``entries`` go right after ``read`` (the history a read of this user returned) and
        before anything stored since, in the same atomic write, then the newest ``max_history`` are kept.
        ``read`` empty: before everything stored now (nothing was there, so all of it came after the read).
        ``read`` not empty: only if the stored history is still ``read``; otherwise nothing is stored and
        ``changed`` is set (a count of what was read cannot place them once the cap trimmed the list since)."""

    @abc.abstractmethod
    async def delete_history(self, user_id: str) -> int:
        """Delete the user's stored history at once; how many entries it held (0: none, nothing to do). The
        write records (``Appended``'s idempotency keys: a digest of each write, no entry) stay to their TTL, so
        a write retried after the delete is answered as the replay it is, not stored again."""

    @abc.abstractmethod
    async def cache_get(self, key: str) -> bytes | None: ...

    @abc.abstractmethod
    async def cache_set(self, key: str, value: bytes, ttl_s: int) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> bool:
        """True when the backend answers now (always true in process)."""

    def unreachable_hint(self) -> str | None:
        """A setting that may explain why ``ping`` got no answer, beyond an outage; None if none."""
        return None

    def describe(self) -> str:
        """The store in words, for an error message (never a password)."""
        return f"the {self.kind} store"

    async def close(self) -> None:
        return None


class MemoryStore(Store):
    kind = "memory"

    def __init__(self, max_history: int, max_cache_entries: int, history_ttl_s: int, idempotency_ttl_s: int) -> None:
        self.max_history = max_history
        self.max_cache_entries = max_cache_entries
        self.history_ttl_s = history_ttl_s
        self.idempotency_ttl_s = idempotency_ttl_s
        # user -> (expiry, entries); last-write order is expiry order (one TTL), so expired users leave from the front
        self._histories: OrderedDict[str, tuple[float, list[str]]] = OrderedDict()
        self._cache: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # key -> (expiry, body), LRU order
        # (user, key) -> (expiry, fingerprint, appended, length); insertion order is expiry order (one TTL)
        self._records: OrderedDict[tuple[str, str], tuple[float, str, int, int]] = OrderedDict()

    async def history(self, user_id: str) -> list[str]:
        return self._held(user_id, time.monotonic())

    def _held(self, user_id: str, now: float) -> list[str]:
        """The user's stored entries (a copy), or none once they expired."""
        expiry, entries = self._histories.get(user_id, (0.0, []))
        if self.history_ttl_s and expiry < now:
            self._histories.pop(user_id, None)
            return []
        return list(entries)

    async def append(self, user_id: str, entries: Sequence[str], idempotency_key: str | None = None) -> Appended:
        return self._write(user_id, entries, idempotency_key, None)

    async def append_after(
        self, user_id: str, entries: Sequence[str], read: Sequence[str], idempotency_key: str
    ) -> Appended:
        return self._write(user_id, entries, idempotency_key, list(read))

    def _write(
        self, user_id: str, entries: Sequence[str], idempotency_key: str | None, read: list[str] | None
    ) -> Appended:
        """``append`` (``read`` None) or ``append_after``: no await inside, so as atomic as Redis's script."""
        now, fp = time.monotonic(), fingerprint(user_id, entries)
        while self._records and next(iter(self._records.values()))[0] < now:
            self._records.popitem(last=False)
        while self.history_ttl_s and self._histories and next(iter(self._histories.values()))[0] < now:
            self._histories.popitem(last=False)  # users no one reads again expire too, not only on a read
        if idempotency_key is not None and (user_id, idempotency_key) in self._records:
            _, stored_fp, appended, length = self._records[(user_id, idempotency_key)]
            if stored_fp != fp:
                raise IdempotencyConflict()
            return Appended(appended, length, replayed=True)
        held = self._held(user_id, now)
        if read and held != read:
            return Appended(0, len(held), changed=True)
        stored = ([*entries, *held] if read == [] else [*held, *entries])[-self.max_history :]
        self._histories[user_id] = (now + self.history_ttl_s, stored)
        self._histories.move_to_end(user_id)
        if idempotency_key is not None:
            self._records[(user_id, idempotency_key)] = (now + self.idempotency_ttl_s, fp, len(entries), len(stored))
        return Appended(len(entries), len(stored))

    async def delete_history(self, user_id: str) -> int:
        held = self._held(user_id, time.monotonic())
        self._histories.pop(user_id, None)
        return len(held)

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


async def read_histories(store: Store, user_ids: Sequence[str], progress: bool = True) -> dict[str, list[str]]:
    """Every user's stored entries, ``HISTORIES_CHUNK`` users per ``histories`` call, behind a progress bar (the
    offline commands read a file's or a data set's users up front)."""
    out: dict[str, list[str]] = {}
    with tqdm(total=len(user_ids), desc="stored histories", unit="user", disable=not progress) as bar:
        for start in range(0, len(user_ids), HISTORIES_CHUNK):
            chunk = user_ids[start : start + HISTORIES_CHUNK]
            out.update(zip(chunk, await store.histories(chunk), strict=True))
            bar.update(len(chunk))
    return out


def store_failure(store: Store, error: StoreUnavailable, what: str) -> str:
    """``<the store> <what> (<error>: <its cause>)[; <the store's hint>]``: a failed call in one line, for the
    offline commands, which stop on it (the service's requests fall back instead)."""
    cause = f": {type(error.__cause__).__name__}: {error.__cause__}" if error.__cause__ is not None else ""
    hint = store.unreachable_hint()
    return f"{store.describe()} {what} ({error}{cause})" + (f"; {hint}" if hint else "")
