"""``vstar load-histories``: the users' histories of a data folder, written into the service's store.

A deployment starts with an empty store, so a ``user_id`` from the training data is a 404 (``no stored history``)
until its events are posted. This command writes each user's timeline, rebuilt from the data's rows, into the
store ``vstar serve`` uses in the same environment, so ``POST /recommend`` with that ``user_id`` alone answers
from it at once.

Design decisions:

* The service's code, not a copy of it: the store is ``service.app.build_store`` over the service's
  ``Settings`` (``REDIS_URL``, ``VSTAR_STORED_HISTORY_MAX``, ``VSTAR_HISTORY_TTL_S``,
  ``VSTAR_IDEMPOTENCY_TTL_S`` ...), read with ``Store.histories`` and written with ``Store.append_after``, the
  twin of the ``Store.append`` that ``POST /users/{id}/events`` runs (the same cap, TTL and idempotency records;
  where it puts the entries: below), so a loaded history is capped, expires and is read exactly as a posted one;
  its entries are ``HistoryEvent.stored()``'s (an item by its item id, in digits). Without ``REDIS_URL`` the
  command is refused: the in-process store would die with the command.
* The data is read by ``training.data.dataset.load_dataset``, the reader training uses (every row checked
  against the index: a bad one is a ``DataError`` naming the file and the line). This is the one service module
  that imports ``training``: the command is the bridge from a training folder to the service; the server never
  imports it.
* Timelines (``next_timeline``): the format's rule is that each row is one next-item event in time order, its
  history the user's most recent events before it (MiniOneRec's sliding window, as ``vstar import`` writes it,
  at most ``--max-history``, so a history is not always a prefix of the timeline). The named splits are read in
  time order (train, valid, test, whatever order ``--splits`` names them in), each file's rows in order. A row
  whose history is the timeline's most recent events appends its target; a row whose history starts with the
  whole timeline so far replaces it (the user's first row, or a later one that reveals more: the longest
  history and its target); a row that is a prefix of the timeline is one seen already. Any other row disagrees:
  one error naming the file, the line and the user (a split left out of ``--splits`` between two others leaves
  a gap that windowed rows cannot bridge, and the error says so). User ids must be ones the service takes
  (``VSTAR_MAX_USER_ID_LENGTH``, ``USER_ID_PATTERN``): no request could read any other.
* A timeline is written capped as the store caps it: its last ``VSTAR_STORED_HISTORY_MAX`` entries, in one
  write per user (one script, atomic: a user is written whole or not at all).
* Events posted while it runs: the service may store a user's events between this command's read of that user
  and its write, and the data's timeline is older than all of them, so it must never land after them (the
  recommender would read it as the user's most recent items). Each write is ``Store.append_after`` with what
  the read returned, checked and placed inside the one atomic script, so no window is left between the two:

  - a user read with nothing stored (every user the default and ``--skip-existing`` write) gets the timeline
    before everything stored at the write, all of which came after the read, and the newest
    ``VSTAR_STORED_HISTORY_MAX`` are kept: what the write would have left had it come first. This is exact
    with nothing more carried: no count to trust, whatever the cap trimmed meanwhile;
  - a user read with entries (``--append``) is written only if the stored history is still what was read.
    Placing the timeline after those entries and before newer ones is not exact: the length read cannot say
    how many arrived once the cap trims the list (a user at the cap stays at the cap), and the store keeps no
    count of writes (``POST /users/{id}/events`` is left as it was). A user that changed is left as it is,
    counted (``changed``) and named (``changed_users``, the first few) in the output and ``--json``; running
    the same command again appends after what they hold then, their new events included (``--append``'s
    choice), or leave them. A change that leaves the very same entries (at the cap, the one item again after
    a history of nothing but it) cannot be told from none; an entry another writer left that is not UTF-8
    is read with a replacement character, so its user always reads as changed.
* Nothing stored is lost: every named user's stored history is read first (one pipeline per
  ``stores.HISTORIES_CHUNK`` users), before anything is written. A user whose stored history is exactly what this load
  writes is counted as already loaded and not written again (a re-run of the same load, whenever it runs). Any
  other stored history stops the command, naming how many users have one and a few of them, unless
  ``--skip-existing`` (leave those users as they are) or ``--append`` (the timeline after what is stored).
* Idempotent writes: each write carries the key ``load_key(user, entries)`` (the store's ``fingerprint`` of
  the user and the entries), so a write the store re-sends, or a re-run of ``--append`` within
  ``VSTAR_IDEMPOTENCY_TTL_S`` (the key's record lives that long), stores once, and says it replayed: counted
  as already loaded. A user read with nothing stored whose key replays either holds the entries now, written
  by another run of the same load that overlapped this one (a retried job: both read the user as empty), and
  counts as already loaded; or had them once and lost them since (their history expired, or was deleted,
  within that TTL): they are written again, under a key of the run's own. (Two overlapping runs that both find
  the same user's history lost, each between the other's re-read and write, can still store it twice.) After
  that TTL nothing marks what an ``--append`` wrote: running it again appends the
  timeline again to every user whose stored history is not exactly the timeline (the default and
  ``--skip-existing`` never write to a user with entries, so re-running them is safe whenever).
* Writes go ``WRITE_CHUNK`` users at a time, concurrently (each its own round trip of the store's script),
  behind a progress bar. A store that fails (down, or refusing: out of memory) stops the command with one line
  naming it and how many users were written before; a re-run continues (the written users are already loaded).
* Redis's timeout is at least ``REDIS_TIMEOUT_S``: ``VSTAR_REDIS_TIMEOUT_S`` (0.25 s) bounds what an outage
  costs a request, and one write that took longer on a busy host opened the store's breaker, which then
  failed the writes in flight beside it (measured: 1408 of 3285 users written, at 64 in flight); a bulk load
  has no request waiting.
* A loaded history expires ``VSTAR_HISTORY_TTL_S`` after the load unless the user's events arrive, as a posted
  one does after its last event.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from models.sid_catalog import SidCatalog
from service.batch_recommend import valid_user_id
from service.errors import StoreUnavailable
from service.history import HistoryEvent
from service.stores import Appended, Store, WriteOutcomeUnknown, fingerprint, read_histories, store_failure
from training.data.data_files import split_records
from training.data.dataset import SPLITS, load_dataset

Mode = Literal["new", "skip-existing", "append"]
WRITE_CHUNK = 16  # appends in flight at once: as fast as 1 or 64 on a loopback Redis (README), hides a network's RTT
REDIS_TIMEOUT_S = 5.0  # the least VSTAR_REDIS_TIMEOUT_S the command runs with (module docstring)
LISTED = 5  # users named in an error


class LoadError(ValueError):
    """The data or the store's contents stop the load; the message says where and what to do."""


@dataclass(frozen=True)
class LoadReport:
    users: int  # users with a timeline in the named splits
    loaded: int  # written now (or, with --dry-run, to be written)
    appended_to: int  # of those, users who had stored entries (--append)
    already_loaded: int  # the store holds this load already: not written again
    skipped: int  # users with other stored entries, left as they are (--skip-existing)
    changed: int  # --append: users whose stored history changed between the read and the write: not written
    changed_users: tuple[str, ...]  # the first LISTED of those
    entries: int  # entries written (or to be written)
    capped: int  # loaded users whose timeline was longer than VSTAR_STORED_HISTORY_MAX: its oldest entries cut
    seconds: float  # reading the store and writing it, after the data was read
    dry_run: bool

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def next_timeline(timeline: list[int], history: Sequence[int], target: int) -> list[int] | None:
    """The user's timeline after one more row (``history`` then ``target``) in time order, or None when the row
    disagrees with it (module docstring)."""
    row = [*history, target]
    if history and timeline[-len(history) :] == list(history):  # the next event after its most recent ones
        return [*timeline, target]
    if list(history[: len(timeline)]) == timeline:  # the first row, or one that reveals more of the past
        return row
    if timeline[: len(row)] == row:  # a row seen already
        return timeline
    return None


def record_line(path: Path, index: int) -> int:
    """The line record ``index`` (0-based, as ``read_split`` lists them) of a split file starts on."""
    for i, (_, _, line, _) in enumerate(split_records(path)):
        if i == index:
            return line
    raise AssertionError(f"{path} has no record {index}")


def read_timelines(
    data_dir: Path, splits: Sequence[str], max_user_id_length: int
) -> tuple[SidCatalog, dict[str, list[int]]]:
    """(the data's catalog, each user's timeline of item ids, oldest first), users in order of first row; a
    ``LoadError`` naming the file and line of the first row that disagrees, or of a user id the service refuses."""
    data = load_dataset(data_dir)
    timelines: dict[str, list[int]] = {}
    for split in [s for s in SPLITS if s in splits]:  # time order, whatever order they were named in
        path = data.files[split]
        for index, row in enumerate(data.splits[split]):
            if row.user_id not in timelines and not valid_user_id(row.user_id, max_user_id_length):
                raise LoadError(
                    f"{path}:{record_line(path, index)}: user_id {row.user_id!r} is no user id the service stores "
                    f"a history under (1 to {max_user_id_length} of A-Z a-z 0-9 _ . @ : -)"
                )
            timeline = timelines.get(row.user_id, [])
            extended = next_timeline(timeline, row.history, row.target)
            if extended is None:
                raise LoadError(_disagreement(path, record_line(path, index), row.user_id, timeline, splits))
            timelines[row.user_id] = extended
    return data.catalog, timelines


def _disagreement(path: Path, line: int, user_id: str, timeline: list[int], splits: Sequence[str]) -> str:
    named = [s for s in SPLITS if s in splits]
    gap = [s for s in SPLITS[SPLITS.index(named[0]) : SPLITS.index(named[-1])] if s not in named]
    hint = (
        f" (--splits leaves out {', '.join(gap)}, between the splits it names: its rows may be the gap)" if gap else ""
    )
    shown = timeline[-10:]
    return (
        f"{path}:{line}: user {user_id!r}: the row's history disagrees with the user's earlier rows: it is neither "
        f"their most recent items ({'..., ' if len(timeline) > len(shown) else ''}{', '.join(map(str, shown))}) "
        f"nor starts with all of them{hint}"
    )


def stored_entries(catalog: SidCatalog, timeline: Sequence[int], cap: int) -> list[str]:
    """The entries ``POST /users/{id}/events`` would store for these items, the last ``cap`` of them."""
    return [HistoryEvent(item_id, catalog.items[item_id].sid).stored() for item_id in timeline[-cap:]]


def load_key(user_id: str, entries: Sequence[str]) -> str:
    """The idempotency key of loading ``entries`` for ``user_id``: the same load, whenever run, has the same."""
    return f"load-histories-{fingerprint(user_id, entries)}"


def begins_with(stored: Sequence[str], entries: Sequence[str], cap: int) -> bool:
    """Whether ``stored`` begins with ``entries`` as a write of them to a user read as empty placed them: before
    every later event, the cap having trimmed at most their oldest (only a history at the cap was trimmed)."""
    n = len(entries)
    if list(stored[:n]) == list(entries):
        return True
    return len(stored) >= cap and any(list(stored[: n - j]) == list(entries[j:]) for j in range(1, n))


@dataclass(frozen=True)
class _Plan:
    write: dict[str, list[str]]  # user -> entries to write
    read: dict[str, list[str]]  # users of ``write`` with stored entries (--append) -> those entries
    already: int
    skipped: int


async def _plan(store: Store, entries: dict[str, list[str]], mode: Mode, progress: bool) -> _Plan:
    """What to write, from every user's stored history, read before anything is written."""
    users = list(entries)
    write: dict[str, list[str]] = {}
    read: dict[str, list[str]] = {}
    existing: list[str] = []
    already = 0
    for user_id, stored in (await read_histories(store, users, progress)).items():
        if stored == entries[user_id]:
            already += 1
        elif not stored or mode == "append":
            write[user_id] = entries[user_id]
            if stored:
                read[user_id] = stored
        else:
            existing.append(user_id)
    if existing and mode == "new":
        named = ", ".join(map(repr, existing[:LISTED])) + (", ..." if len(existing) > LISTED else "")
        have = "has" if len(existing) == 1 else "have"
        raise LoadError(
            f"{len(existing)} of the {len(users)} users already {have} other entries in {store.describe()} "
            f"({named}); nothing was written: give --skip-existing to load only the users with nothing stored, "
            "or --append to append each timeline after what is stored"
        )
    return _Plan(write, read, already, len(existing) if mode == "skip-existing" else 0)


async def _write(store: Store, plan: _Plan, cap: int, progress: bool) -> tuple[set[str], list[str]]:
    """Write every planned user's entries after what the plan read, ``WRITE_CHUNK`` users at a time; returns the
    users whose key replayed (this load stored them before) and those whose stored history changed since the
    read (not written). A store that fails is a ``LoadError`` saying how many were written.

    A user who had nothing stored when the plan read the store, and whose key replays, either holds this load's
    entries from another run of it that overlapped this one (both read the user as empty: counted as replayed),
    or had them once and lost them since (their history expired, or was deleted, within the key's record's TTL):
    written again under a key of this run's, not counted as replayed."""
    users, written, replayed, changed = list(plan.write), 0, set[str](), list[str]()
    run = uuid.uuid4().hex[:12]

    async def append(user_id: str) -> Appended:
        entries, read = plan.write[user_id], plan.read.get(user_id, [])
        done = await store.append_after(user_id, entries, read, load_key(user_id, entries))
        if done.replayed and not read and not begins_with(await store.history(user_id), entries, cap):
            # stored once, gone now: the replay stored nothing
            done = await store.append_after(user_id, entries, read, f"{load_key(user_id, entries)}-{run}")
        return done

    with tqdm(total=len(users), desc="load histories", unit="user", disable=not progress) as bar:
        for start in range(0, len(users), WRITE_CHUNK):
            chunk = users[start : start + WRITE_CHUNK]
            results = await asyncio.gather(*(append(u) for u in chunk), return_exceptions=True)
            answered = {u: r for u, r in zip(chunk, results, strict=True) if isinstance(r, Appended)}
            written += sum(not r.changed for r in answered.values())
            replayed.update(u for u, r in answered.items() if r.replayed)
            changed.extend(u for u, r in answered.items() if r.changed)
            failed = [r for r in results if not isinstance(r, Appended)]
            if failed:
                raise LoadError(_stopped(store, failed, written, len(users)))
            bar.update(len(chunk))
    return replayed, changed


def _stopped(store: Store, failed: list[BaseException], written: int, planned: int) -> str:
    error = next((e for e in failed if e.__cause__ is not None), failed[0])  # the cause, not the breaker's skips
    if not isinstance(error, StoreUnavailable):
        raise error  # a bug, not the store: keep its traceback
    unknown = sum(isinstance(e, WriteOutcomeUnknown) for e in failed)
    maybe = f" ({unknown} more may have been)" if unknown else ""
    return (
        f"{store_failure(store, error, 'failed')}: {written} of {planned} users were written before it "
        f"stopped{maybe}; each user is written whole, under an idempotency key, so running the same command "
        "again continues where this one stopped"
    )


async def load_into(
    store: Store,
    catalog: SidCatalog,
    timelines: dict[str, list[int]],
    cap: int,
    mode: Mode = "new",
    dry_run: bool = False,
    progress: bool = True,
) -> LoadReport:
    """Write ``timelines`` (item ids) into ``store``, capped at ``cap`` (the store's ``VSTAR_STORED_HISTORY_MAX``);
    ``LoadError`` for users with other stored entries (``mode`` "new") or a store that fails."""
    t0 = time.perf_counter()
    entries = {u: stored_entries(catalog, t, cap) for u, t in timelines.items()}
    try:
        plan = await _plan(store, entries, mode, progress)
    except StoreUnavailable as e:
        raise LoadError(f"{store_failure(store, e, 'could not be read')}; nothing was written") from None
    replayed, changed = (set[str](), []) if dry_run else await _write(store, plan, cap, progress)
    not_written = replayed.union(changed)
    loaded = [u for u in plan.write if u not in not_written]
    return LoadReport(
        users=len(timelines),
        loaded=len(loaded),
        appended_to=sum(u in plan.read for u in loaded),
        already_loaded=plan.already + len(replayed),
        skipped=plan.skipped,
        changed=len(changed),
        changed_users=tuple(changed[:LISTED]),
        entries=sum(len(plan.write[u]) for u in loaded),
        capped=sum(len(timelines[u]) > cap for u in loaded),
        seconds=time.perf_counter() - t0,
        dry_run=dry_run,
    )


def load_histories(
    store: Store,
    catalog: SidCatalog,
    timelines: dict[str, list[int]],
    cap: int,
    mode: Mode = "new",
    dry_run: bool = False,
    progress: bool = True,
) -> LoadReport:
    """``load_into`` in an event loop of its own; the store is closed after."""

    async def run() -> LoadReport:
        try:
            return await load_into(store, catalog, timelines, cap, mode, dry_run, progress)
        finally:
            await store.close()

    return asyncio.run(run())
