"""``vstar load-histories``: timelines rebuilt from a data folder's rows, written into the service's store.

The logic runs against the in-process ``MemoryStore`` through ``load_into``; one test runs the command on the
real Redis (DB 15, ``clean_redis``), and one answers ``POST /recommend`` from what was loaded. Events posted
between the command's read and its writes (the service's ``append`` run from inside the read) are tested on
both stores, and through the command on Redis.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from models.sid_catalog import SidCatalog
from service.app import create_app
from service.errors import StoreUnavailable
from service.load_histories import (
    LoadError,
    LoadReport,
    Mode,
    begins_with,
    load_into,
    next_timeline,
    read_timelines,
)
from service.redis_store import HISTORY_KEY, RedisStore
from service.settings import Settings
from service.stores import Appended, MemoryStore, Store
from training.data.dataset import Sample
from training.data.dataset_writer import write_dataset
from vstar import app

T = TypeVar("T")

# Rows in time order, as the format has them: "pre" with whole histories (each a prefix of the next), "win"
# with MiniOneRec's sliding window of 2, "rep" one item again and again (window 2), "late" only in test.
ROWS = {
    "train": [
        Sample("pre", (1,), 2),
        Sample("win", (10,), 11),
        Sample("rep", (7,), 7),
        Sample("pre", (1, 2), 3),
        Sample("win", (10, 11), 12),
        Sample("rep", (7, 7), 7),
        Sample("win", (11, 12), 13),
    ],
    "valid": [Sample("pre", (1, 2, 3), 4), Sample("win", (12, 13), 14), Sample("rep", (7, 7), 8)],
    "test": [Sample("win", (13, 14), 15), Sample("pre", (1, 2, 3, 4), 5), Sample("late", (20, 21), 22)],
}
TIMELINES = {"pre": [1, 2, 3, 4, 5], "win": [10, 11, 12, 13, 14, 15], "rep": [7, 7, 7, 8], "late": [20, 21, 22]}


def write_data(out: Path, catalog: SidCatalog, rows: dict[str, list[Sample]] = ROWS) -> Path:
    write_dataset(out, catalog, rows, {i: {"title": it.title} for i, it in catalog.items.items()}, None)
    return out


@pytest.fixture
def data_dir(tmp_path: Path, tiny_catalog: SidCatalog) -> Path:
    return write_data(tmp_path / "data", tiny_catalog)


def memory_store(max_history: int = 100) -> MemoryStore:
    return MemoryStore(max_history, 10, 0, 3600)


def load(
    store: Store, catalog: SidCatalog, timelines: dict[str, list[int]], mode: Mode = "new", **kw: object
) -> LoadReport:
    cap = int(kw.pop("cap", 100))  # type: ignore[call-overload]
    return asyncio.run(load_into(store, catalog, timelines, cap, mode, progress=False, **kw))  # type: ignore[arg-type]


def stored(store: Store, users: Sequence[str]) -> dict[str, list[str]]:
    return dict(zip(users, asyncio.run(store.histories(users)), strict=True))


def as_entries(timelines: dict[str, list[int]]) -> dict[str, list[str]]:
    return {u: [str(i) for i in t] for u, t in timelines.items()}


def test_next_timeline_takes_prefixes_windows_and_rows_seen_and_refuses_the_rest() -> None:
    assert next_timeline([], [1, 2], 3) == [1, 2, 3]
    assert next_timeline([1, 2], [1, 2], 3) == [1, 2, 3]  # the next event
    assert next_timeline([1, 2, 3], [2, 3], 4) == [1, 2, 3, 4]  # a window of the most recent events
    assert next_timeline([1, 2], [1, 2, 3], 4) == [1, 2, 3, 4]  # a longer history reveals more (a row skipped)
    assert next_timeline([1, 2, 3, 4], [1], 2) == [1, 2, 3, 4]  # a row seen already (out of time order)
    assert next_timeline([1, 2, 3], [1, 9], 3) is None
    assert next_timeline([1, 2, 3], [5, 6], 7) is None


def test_timelines_from_the_rows_of_every_named_split_in_time_order(data_dir: Path) -> None:
    catalog, timelines = read_timelines(data_dir, ["train", "valid", "test"], 128)
    assert timelines == TIMELINES and set(catalog.items) == set(range(120))
    assert read_timelines(data_dir, ["test", "valid", "train"], 128)[1] == TIMELINES  # named in any order
    assert read_timelines(data_dir, ["valid", "test"], 128)[1] == {
        "pre": [1, 2, 3, 4, 5],
        "win": [12, 13, 14, 15],
        "rep": [7, 7, 8],
        "late": [20, 21, 22],
    }


def test_a_row_that_disagrees_is_one_error_naming_the_file_and_line(tmp_path: Path, tiny_catalog: SidCatalog) -> None:
    valid = [*ROWS["valid"], Sample("pre", (1, 9, 3), 4)]  # not what pre's earlier rows say
    data = write_data(tmp_path / "data", tiny_catalog, ROWS | {"valid": valid})
    with pytest.raises(LoadError) as e:
        read_timelines(data, ["train", "valid", "test"], 128)
    assert str(e.value).startswith(
        f"{data / 'valid.csv'}:5: user 'pre': the row's history disagrees with the user's earlier rows: it is "
        "neither their most recent items (1, 2, 3, 4) nor starts with all of them"
    )
    # windowed rows across a split left out cannot be joined: said so
    with pytest.raises(LoadError, match=r"test.csv:2: user 'win'.*--splits leaves out valid, between the splits"):
        read_timelines(write_data(tmp_path / "ok", tiny_catalog), ["train", "test"], 128)
    bad_user = ROWS | {"test": [*ROWS["test"], Sample("no spaces", (1,), 2)]}
    with pytest.raises(LoadError, match=r"test.csv:5: user_id 'no spaces' is no user id the service stores"):
        read_timelines(write_data(tmp_path / "bad", tiny_catalog, bad_user), ["test"], 128)


def test_loads_each_timeline_as_the_service_stores_it_capped(tiny_catalog: SidCatalog) -> None:
    store = memory_store(max_history=4)
    report = load(store, tiny_catalog, TIMELINES, cap=4)
    assert stored(store, list(TIMELINES)) == {u: e[-4:] for u, e in as_entries(TIMELINES).items()}
    assert (report.users, report.loaded, report.already_loaded, report.skipped) == (4, 4, 0, 0)
    assert (report.entries, report.capped, report.appended_to) == (4 + 4 + 4 + 3, 2, 0)


def test_dry_run_writes_nothing(tiny_catalog: SidCatalog) -> None:
    store = memory_store()
    report = load(store, tiny_catalog, TIMELINES, dry_run=True)
    assert report.loaded == 4 and report.entries == 18 and report.dry_run
    assert stored(store, list(TIMELINES)) == {u: [] for u in TIMELINES}


def test_users_with_other_stored_entries_stop_it_before_any_write(tiny_catalog: SidCatalog) -> None:
    store = memory_store()
    asyncio.run(store.append("win", ["99"]))
    asyncio.run(store.append("late", ["98", "97"]))
    for dry_run in (True, False):
        with pytest.raises(LoadError) as e:
            load(store, tiny_catalog, TIMELINES, dry_run=dry_run)
        assert str(e.value) == (
            "2 of the 4 users already have other entries in the memory store ('win', 'late'); nothing was "
            "written: give --skip-existing to load only the users with nothing stored, or --append to append "
            "each timeline after what is stored"
        )
    assert stored(store, list(TIMELINES)) == {"pre": [], "win": ["99"], "rep": [], "late": ["98", "97"]}

    skipping = load(store, tiny_catalog, TIMELINES, "skip-existing")
    assert (skipping.loaded, skipping.skipped, skipping.entries) == (2, 2, 5 + 4)
    expected = as_entries(TIMELINES) | {"win": ["99"], "late": ["98", "97"]}
    assert stored(store, list(TIMELINES)) == expected

    appending = load(store, tiny_catalog, TIMELINES, "append")
    assert (appending.loaded, appending.appended_to, appending.already_loaded) == (2, 2, 2)
    expected |= {"win": ["99", *as_entries(TIMELINES)["win"]], "late": ["98", "97", "20", "21", "22"]}
    assert stored(store, list(TIMELINES)) == expected


def test_running_the_same_load_again_stores_nothing_twice(tiny_catalog: SidCatalog) -> None:
    store = memory_store()
    assert load(store, tiny_catalog, TIMELINES).loaded == 4
    again = load(store, tiny_catalog, TIMELINES)  # each stored history is this load: no conflict, no write
    assert (again.loaded, again.already_loaded, again.entries) == (0, 4, 0)
    assert stored(store, list(TIMELINES)) == as_entries(TIMELINES)

    asyncio.run(store.append("pre", ["50"]))  # an event after the load
    first = load(store, tiny_catalog, {"pre": TIMELINES["pre"]}, "append")
    # --append wrote nothing: the key of this load's write replays (within VSTAR_IDEMPOTENCY_TTL_S)
    assert (first.loaded, first.already_loaded) == (0, 1)
    assert stored(store, ["pre"])["pre"] == ["1", "2", "3", "4", "5", "50"]


def test_a_loaded_history_lost_since_is_loaded_again(tiny_catalog: SidCatalog) -> None:
    """A user whose loaded history expired (or was deleted) within the key's TTL: the load's key replayed, so a
    re-run wrote nothing and counted the user as already loaded, with nothing stored."""
    store = memory_store()
    assert load(store, tiny_catalog, TIMELINES).loaded == 4
    del store._histories["pre"]  # expired, or deleted, while the load's idempotency record lives
    again = load(store, tiny_catalog, TIMELINES)
    assert (again.loaded, again.already_loaded, again.entries) == (1, 3, len(TIMELINES["pre"]))
    assert stored(store, list(TIMELINES)) == as_entries(TIMELINES)


class StopsAfter(MemoryStore):
    """Takes ``ok`` appends, then fails as a Redis that went down does."""

    def __init__(self, ok: int) -> None:
        super().__init__(100, 10, 0, 3600)
        self.ok = ok

    async def append_after(
        self, user_id: str, entries: Sequence[str], read: Sequence[str], idempotency_key: str
    ) -> Appended:
        if self.ok == 0:
            raise StoreUnavailable("Redis is unavailable (append history)")
        self.ok -= 1
        return await super().append_after(user_id, entries, read, idempotency_key)


def test_a_store_that_fails_says_how_many_were_written_and_a_rerun_continues(tiny_catalog: SidCatalog) -> None:
    store = StopsAfter(ok=2)
    with pytest.raises(LoadError) as e:
        load(store, tiny_catalog, TIMELINES)
    assert str(e.value) == (
        "the memory store failed (Redis is unavailable (append history)): 2 of 4 users were written before it "
        "stopped; each user is written whole, under an idempotency key, so running the same command again "
        "continues where this one stopped"
    )
    store.ok = 100
    again = load(store, tiny_catalog, TIMELINES)
    assert (again.loaded, again.already_loaded) == (2, 2)
    assert stored(store, list(TIMELINES)) == as_entries(TIMELINES)


def test_post_recommend_by_user_id_answers_from_the_loaded_history(
    make_settings: Callable[..., Settings], tiny_catalog: SidCatalog
) -> None:
    with TestClient(create_app(make_settings(cache_ttl_s=0))) as c:
        load(c.app.state.recommender.store, tiny_catalog, TIMELINES)  # type: ignore[attr-defined]
        for user_id, timeline in TIMELINES.items():
            by_user = c.post("/recommend", json={"user_id": user_id, "k": 3})
            assert by_user.status_code == 200, by_user.text
            assert by_user.json()["stored_history"] == "used"
            assert by_user.json()["history_length"] == len(timeline)
            by_history = c.post("/recommend", json={"history": timeline, "k": 3}).json()
            assert by_user.json()["items"] == by_history["items"]


def test_the_command_on_redis(data_dir: Path, clean_redis: str, tmp_path: Path, dead_redis_url: str) -> None:
    args = ["load-histories", "--data", str(data_dir)]
    result = CliRunner().invoke(app, [*args, "--json", str(tmp_path / "report.json")], env={"REDIS_URL": clean_redis})
    assert result.exit_code == 0, result.output
    summary = result.stdout.strip()  # the progress bars are on stderr
    assert summary.startswith(
        "4 of 4 users loaded (0 after their stored entries), 0 already loaded, 0 skipped; 18 entries (0 timelines "
        f"cut to VSTAR_STORED_HISTORY_MAX 100) -> Redis at {clean_redis}: "
    ), summary
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["loaded"] == 4 and report["entries"] == 18 and report["mode"] == "new"
    client = redis.Redis.from_url(clean_redis)
    for user_id, timeline in TIMELINES.items():
        assert client.lrange(HISTORY_KEY.format(user_id), 0, -1) == [str(i).encode() for i in timeline]

    # the compose histories profile runs the GPU image's environment without a GPU: no model loads, no device is read
    again = CliRunner().invoke(app, args, env={"REDIS_URL": clean_redis, "VSTAR_DEVICE": "cuda:7"})
    assert again.exit_code == 0 and again.stdout.startswith(
        "0 of 4 users loaded (0 after their stored entries), 4 already"
    )
    client.rpush(HISTORY_KEY.format("rep"), b"1")
    refused = CliRunner().invoke(app, args, env={"REDIS_URL": clean_redis})
    assert refused.exit_code == 2
    assert refused.output.strip().splitlines()[-1].startswith("Error: 1 of the 4 users already has other entries")

    no_redis = CliRunner().invoke(app, args, env={"REDIS_URL": None, "VSTAR_REDIS_URL": None})
    assert no_redis.exit_code == 2 and no_redis.output.startswith("Error: vstar load-histories needs REDIS_URL")
    down = CliRunner().invoke(app, args, env={"REDIS_URL": dead_redis_url})
    assert down.exit_code == 2
    error = down.output.strip().splitlines()[-1]
    assert error.startswith(f"Error: Redis at {dead_redis_url} could not be read") and "nothing was written" in error


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Callable[[int], Callable[[], Store]]:
    """cap -> a maker of the store to run on: the one ``MemoryStore`` each time, or a ``RedisStore`` over the test
    DB (a new one per event loop: its connections belong to the loop that made them)."""
    if request.param == "memory":
        return lambda cap: (lambda store: lambda: store)(memory_store(cap))
    url = request.getfixturevalue("clean_redis")
    return lambda cap: lambda: RedisStore(url, cap, 1.0, 1.0, 0, 3600, 1.0)


def using(make: Callable[[], Store], use: Callable[[Store], Awaitable[T]]) -> T:
    async def run() -> T:
        store = make()
        try:
            return await use(store)
        finally:
            await store.close()

    return asyncio.run(run())


def load_meanwhile(
    make: Callable[[], Store], catalog: SidCatalog, live: dict[str, list[str]], mode: Mode, cap: int
) -> LoadReport:
    """``load_into`` with ``live`` events posted (the service's own ``append``, as ``POST /users/{id}/events``)
    right after the command read the stored histories, before any of its writes."""

    async def use(store: Store) -> LoadReport:
        read = store.histories

        async def read_then_post(user_ids: Sequence[str]) -> list[list[str]]:
            histories = await read(user_ids)
            for user_id, entries in live.items():
                await store.append(user_id, entries, f"live-{user_id}")
            return histories

        store.histories = read_then_post  # type: ignore[method-assign]
        return await load_into(store, catalog, TIMELINES, cap, mode, progress=False)

    return using(make, use)


def stored_in(make: Callable[[], Store]) -> dict[str, list[str]]:
    return dict(zip(TIMELINES, using(make, lambda store: store.histories(list(TIMELINES))), strict=True))


def test_two_runs_of_one_load_that_overlap_store_each_timeline_once(
    backend: Callable[[int], Callable[[], Store]], tiny_catalog: SidCatalog
) -> None:
    """Both read every user as empty; the second's writes replay the first's keys, which read as "lost since"
    and were written again under its own key: every timeline twice (a retried job, two operators)."""
    make = backend(100)

    async def both(store: Store) -> tuple[LoadReport, LoadReport]:
        first, second = await asyncio.gather(
            *(load_into(store, tiny_catalog, TIMELINES, 100, progress=False) for _ in range(2))
        )
        return first, second

    first, second = using(make, both)
    assert stored_in(make) == as_entries(TIMELINES)
    assert first.loaded + second.loaded == 4 and first.already_loaded + second.already_loaded == 4


def test_begins_with_allows_only_the_oldest_entries_trimmed_and_only_at_the_cap() -> None:
    assert begins_with(["1", "2", "3", "9"], ["1", "2", "3"], 100)
    assert begins_with(["2", "3", "9", "9"], ["1", "2", "3"], 4)  # at the cap: the oldest trimmed
    assert not begins_with(["2", "3", "9"], ["1", "2", "3"], 4)  # below the cap nothing was trimmed
    assert not begins_with([], ["1"], 4) and not begins_with(["9", "1"], ["1"], 2)


def test_events_posted_between_the_read_and_the_write_stay_the_most_recent(
    backend: Callable[[int], Callable[[], Store]], tiny_catalog: SidCatalog
) -> None:
    """Users read with nothing stored: the older timeline goes before whatever arrived meanwhile, capped as the
    store caps (the newest 4 kept), never after it."""
    make = backend(4)
    live = {"pre": ["50"], "win": ["60", "61", "62", "63", "64"], "late": ["70", "71"]}  # win: more than the cap
    report = load_meanwhile(make, tiny_catalog, live, "new", cap=4)
    assert stored_in(make) == {
        "pre": ["3", "4", "5", "50"],
        "win": ["61", "62", "63", "64"],
        "rep": ["7", "7", "7", "8"],
        "late": ["21", "22", "70", "71"],
    }
    assert (report.loaded, report.already_loaded, report.changed, report.changed_users) == (4, 0, 0, ())
    # each write kept its idempotency record: --append run again finds every user loaded, and writes nothing
    again = using(make, lambda store: load_into(store, tiny_catalog, TIMELINES, 4, "append", progress=False))
    assert (again.loaded, again.already_loaded) == (0, 4)
    assert stored_in(make)["pre"] == ["3", "4", "5", "50"]


def test_append_leaves_a_user_whose_history_changed_since_the_read_and_names_them(
    backend: Callable[[int], Callable[[], Store]], tiny_catalog: SidCatalog
) -> None:
    make = backend(100)
    using(make, lambda store: store.append("win", ["99"]))
    using(make, lambda store: store.append("late", ["98", "97"]))
    report = load_meanwhile(make, tiny_catalog, {"win": ["50"], "pre": ["51"]}, "append", cap=100)
    assert (report.loaded, report.appended_to, report.already_loaded) == (3, 1, 0)
    assert (report.changed, report.changed_users) == (1, ("win",))
    assert report.entries == 5 + 4 + 3
    entries = as_entries(TIMELINES)
    expected = entries | {"win": ["99", "50"], "pre": [*entries["pre"], "51"], "late": ["98", "97", "20", "21", "22"]}
    assert stored_in(make) == expected

    again = using(make, lambda store: load_into(store, tiny_catalog, TIMELINES, 100, "append", progress=False))
    assert (again.loaded, again.appended_to, again.already_loaded, again.changed) == (1, 1, 3, 0)
    assert stored_in(make) == expected | {"win": ["99", "50", *entries["win"]]}


def test_the_command_names_the_users_it_left_as_they_changed(
    data_dir: Path, clean_redis: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = redis.Redis.from_url(clean_redis)
    client.rpush(HISTORY_KEY.format("win"), b"99")
    read = RedisStore.histories

    async def read_then_post(self: RedisStore, user_ids: Sequence[str]) -> list[list[str]]:
        histories = await read(self, user_ids)
        await self.append("win", ["50"])
        return histories

    monkeypatch.setattr(RedisStore, "histories", read_then_post)
    args = ["load-histories", "--data", str(data_dir), "--append", "--json", str(tmp_path / "report.json")]
    result = CliRunner().invoke(app, args, env={"REDIS_URL": clean_redis})
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].startswith("3 of 4 users loaded (0 after their stored entries)")
    assert result.stdout.splitlines()[1] == (
        "1 user's stored history changed while the command ran ('win'): not written; run the same command again "
        "to append each timeline after what is stored now, their new events included, or leave them as they are"
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["changed"], report["changed_users"], report["loaded"]) == (1, ["win"], 3)
    assert client.lrange(HISTORY_KEY.format("win"), 0, -1) == [b"99", b"50"]
