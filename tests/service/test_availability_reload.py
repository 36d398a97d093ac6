"""A changed ``VSTAR_UNAVAILABLE_ITEMS`` applied while serving (``service.availability.watch``): the items it lists
leave both decoders' answers and the cache's, a file that cannot be used changes nothing, and no answer is cached
while a change is under way."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from models.sid_catalog import SidCatalog, parse_sid
from service.app import create_app
from service.availability import Unavailable, UnavailableItemsError, file_version, watch
from service.settings import Settings
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
