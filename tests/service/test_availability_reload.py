"""A changed ``VSTAR_UNAVAILABLE_ITEMS`` applied while serving (``service.availability.watch``): the items it lists
leave both decoders' answers and the cache's (a read under way when it changes included), a file that cannot be used
changes nothing, no answer is cached while a change is under way, and a decode planned under the new list searches
its trie even while the model thread is still busy with one begun before it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from models.checkpoint import load_checkpoint
from models.sid_catalog import SidCatalog, parse_sid
from service.app import create_app, value_head_or_fresh
from service.availability import Unavailable, UnavailableItemsError, file_version, read_unavailable, watch
from service.history import resolve_entries
from service.metrics import ServiceMetrics
from service.recommender import Recommender
from service.schemas import request_models
from service.settings import Settings
from service.stores import MemoryStore
from tests.service.conftest import wait_until


def replace_file(path: Path, body: Any) -> None:
    """As a deployment should: the new file written beside the old and renamed over it."""
    fresh = path.with_suffix(".new")
    fresh.write_text(body if isinstance(body, str) else json.dumps(body))
    os.replace(fresh, path)


def sids_of(answer: dict[str, Any]) -> list[str]:
    return [it["sid"] for it in answer["items"]]


def reloads(client: TestClient, result: str) -> float:
    registry = client.app.state.recommender.metrics.registry  # type: ignore[attr-defined]
    return registry.get_sample_value("vstar_unavailable_reloads_total", {"result": result}) or 0.0


def test_a_changed_file_takes_effect_without_a_restart(
    make_settings: Callable[..., Settings],
    tiny_catalog: SidCatalog,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The SID ranked first, listed once serving: gone from beam's answer (the cached one included: the key holds
    the set) and from VED's, the trie without it; a broken file then keeps that set; an empty one brings it back."""
    path = tmp_path / "unavailable.json"
    path.write_text("[]")
    body = {"history": [11, 12, 13], "k": 6}
    ved = body | {"mode": "ved", "latency_ms": 1000}
    with TestClient(create_app(make_settings(unavailable_items=path, unavailable_reload_s=0.02))) as c:
        rec = c.app.state.recommender  # type: ignore[attr-defined]
        plain = c.post("/recommend", json=body).json()
        assert c.post("/recommend", json=body).json()["cached"]
        first = plain["items"][0]["sid"]
        first_ved = sids_of(c.post("/recommend", json=ved).json())[0]
        listed = sorted({first, first_ved})
        replace_file(path, listed)
        assert wait_until(lambda: reloads(c, "applied") == 1)
        assert rec.policy.trie.num_sids == len(tiny_catalog.sids) - len(listed)
        gone = {i for sid in listed for i in tiny_catalog.items_of(parse_sid(sid))}
        assert rec.unavailable.items == gone
        for request in (body, ved):
            answer = c.post("/recommend", json=request).json()
            assert not answer["cached"] and len(answer["items"]) == 6 and not set(sids_of(answer)) & set(listed)
        assert f"vstar_unavailable_items {float(len(gone))}" in c.get("/metrics").text

        with caplog.at_level(logging.ERROR, logger="service.recommender"):
            replace_file(path, "[1, 2")
            assert wait_until(lambda: reloads(c, "refused") == 1)
        assert any(
            r.getMessage().startswith(f"VSTAR_UNAVAILABLE_ITEMS={path}: not JSON")
            and r.getMessage().endswith("the unavailable items in force are kept")
            for r in caplog.records
        ), [r.getMessage() for r in caplog.records]
        assert rec.unavailable.items == gone and first not in sids_of(c.post("/recommend", json=body).json())

        replace_file(path, [])
        assert wait_until(lambda: reloads(c, "applied") == 2)
        assert rec.policy.trie.num_sids == len(tiny_catalog.sids) and rec.unavailable.digest is None
        again = c.post("/recommend", json=body).json()
        assert again["cached"] and sids_of(again) == sids_of(plain)  # the entry cached before the change serves again


def test_with_reloads_off_the_file_is_read_at_start_alone(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    path = tmp_path / "unavailable.json"
    path.write_text("[]")
    with TestClient(create_app(make_settings(unavailable_items=path, unavailable_reload_s=0))) as c:
        rec = c.app.state.recommender  # type: ignore[attr-defined]
        in_force = rec.unavailable
        replace_file(path, [1, 2])
        time.sleep(0.3)
        assert rec.unavailable is in_force and reloads(c, "applied") == reloads(c, "refused") == 0


def test_no_answer_is_cached_while_a_change_is_under_way(make_settings: Callable[..., Settings]) -> None:
    """Its search may have run on the trie before the change (``Recommender.apply_unavailable``)."""
    body = {"history": [31, 32], "k": 4}
    with TestClient(create_app(make_settings())) as c:
        rec = c.app.state.recommender  # type: ignore[attr-defined]
        rec.availability_changes = 1  # one begun, not ended
        assert not c.post("/recommend", json=body).json()["cached"]
        assert not c.post("/recommend", json=body).json()["cached"]
        rec.availability_changes = 2
        assert not c.post("/recommend", json=body).json()["cached"]
        assert c.post("/recommend", json=body).json()["cached"]


def test_the_watch_reads_each_change_once_and_outlives_a_failed_apply(
    tiny_catalog: SidCatalog, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "unavailable.json"
    path.write_text("[3]")
    applied: list[frozenset[int]] = []
    refused: list[str] = []

    async def apply(new: Unavailable) -> None:
        applied.append(new.items)
        if new.items == {5}:
            raise RuntimeError("the model thread is gone")

    def refuse(error: UnavailableItemsError) -> None:
        refused.append(str(error))

    async def scenario() -> None:
        task = asyncio.create_task(watch(path, 0.01, tiny_catalog, file_version(path), apply, refuse))
        for body in ("[4]", "[5]", "[6", "[7]"):
            replace_file(path, body)
            await asyncio.sleep(0.1)  # several polls of one version
        path.unlink()
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.ERROR, logger="service.availability"):
        asyncio.run(scenario())
    assert applied == [{4}, {5}, {7}]
    assert len(refused) == 2 and "not JSON" in refused[0] and "cannot be read" in refused[1]  # the last: gone
    assert any("applying the changed file failed" in r.getMessage() for r in caplog.records)


class HeldCacheReads(MemoryStore):
    """The in-process store whose cache reads wait for ``release`` once ``hold`` is set: a slow Redis round trip."""

    def __init__(self) -> None:
        super().__init__(100, 100, 0, 3600)
        self.hold = False
        self.reading = asyncio.Event()
        self.release = asyncio.Event()

    async def cache_get(self, key: str) -> bytes | None:
        body = await super().cache_get(key)
        if self.hold:
            self.reading.set()
            await self.release.wait()
        return body


def recommender(settings: Settings, store: MemoryStore) -> Recommender:
    checkpoint = load_checkpoint(settings.checkpoint, "cpu")
    return Recommender(checkpoint, value_head_or_fresh(checkpoint, "cpu"), settings, store, ServiceMetrics())


def test_a_cache_hit_read_while_the_list_changes_is_not_served(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Its key was taken under the list before: the item listed meanwhile would be served from it."""
    path = tmp_path / "unavailable.json"
    path.write_text("[]")
    settings = make_settings(unavailable_items=path, unavailable_reload_s=0, warmup=False)

    async def scenario() -> None:
        store = HeldCacheReads()
        rec = recommender(settings, store)
        rec.start()
        try:
            req = request_models(settings).recommend(history=[11, 12, 13], k=4)
            first = await rec.recommend(req)
            top = first.items[0].item_ids[0]
            store.hold = True
            pending = asyncio.create_task(rec.recommend(req))  # its key taken, its cache read under way
            await store.reading.wait()
            path.write_text(json.dumps([top]))
            await rec.apply_unavailable(read_unavailable(path, rec.catalog))
            store.release.set()
            second = await pending
            assert not second.cached and len(second.items) == 4
            assert top not in {i for it in second.items for i in it.item_ids}
        finally:
            await rec.close()

    asyncio.run(scenario())


def test_a_beam_planned_under_a_new_list_searches_its_trie_while_an_earlier_decode_holds_the_thread(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """A beam request planned once the new list is in force, decoded while the model thread is still busy with
    a decode begun before it (as a beam between a VED search's steps is): its width counts the listed SIDs as
    gone, so it must search the trie without them, or the ranking drops them and the answer comes back short."""
    path = tmp_path / "unavailable.json"
    path.write_text("[]")
    settings = make_settings(unavailable_items=path, unavailable_reload_s=0, warmup=False, cache_ttl_s=0)

    async def scenario() -> None:
        rec = recommender(settings, HeldCacheReads())
        rec.start()
        busy, release = threading.Event(), threading.Event()

        def earlier_decode() -> None:  # holds the model thread, as a search under way does
            busy.set()
            release.wait(10)

        try:
            req = request_models(settings).recommend(history=[11, 12, 13], k=4)
            before = await rec.recommend(req)
            path.write_text(json.dumps([i for it in before.items for i in it.item_ids]))  # beam's whole answer
            held = asyncio.get_running_loop().run_in_executor(rec.executor, earlier_decode)
            await asyncio.to_thread(busy.wait, 10)
            change = asyncio.create_task(rec.apply_unavailable(read_unavailable(path, rec.catalog)))
            while rec.unavailable.digest is None:
                await asyncio.sleep(0.001)
            plan = rec.plan(req, resolve_entries(rec.catalog, req.history, "history"))
            (row,) = rec.decode(plan.config, [plan.job])  # where run_waiting would decode it: between steps
            during = rec.rank(row, plan.excluded, req.k)
            assert len(during) == 4 and not {s.sid for s in during} & {it.sid for it in before.items}
            release.set()
            await held
            await change
        finally:
            release.set()
            await rec.close()

    asyncio.run(scenario())
