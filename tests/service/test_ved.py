"""VED through the API: k items with search stats, the anytime fallback, and the latency cap.

Wall-clock assertions here are deliberately loose (the cap's tightness is the
benchmark's job, ``vstar bench serve``); what is tested is that the cap binds:
a search that would run for seconds returns about when its cap says.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from models.sid_catalog import sid_to_str
from models.ved import VEDConfig, ved_search
from service.app import create_app
from service.settings import Settings


@pytest.fixture(scope="module")
def client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(cache_ttl_s=0))) as c:
        yield c


@pytest.fixture(scope="module")
def app(client: TestClient) -> FastAPI:
    assert isinstance(client.app, FastAPI)
    return client.app


def test_ved_returns_k_items_with_search_stats(client: TestClient) -> None:
    body = client.post("/recommend", json={"history": [1, 2, 3], "k": 6, "mode": "ved", "latency_ms": 1000}).json()
    assert body["mode"] == "ved" and len(body["items"]) == 6
    assert len({it["sid"] for it in body["items"]}) == 6
    stats = body["search"]
    assert stats["tokens_spent"] > 0 and stats["nodes"] > stats["tokens_spent"] - 1 and stats["max_depth"] == 3


def test_anytime_fallback_returns_the_initial_tree(app: FastAPI, client: TestClient) -> None:
    """A cap that has passed before the search loop starts returns the initial beam tree's k SIDs."""
    body = client.post("/recommend", json={"history": [4, 5], "k": 7, "mode": "ved", "latency_ms": 1}).json()
    assert body["cap_hit"] is True and body["search"]["iterations"] == 0 and len(body["items"]) == 7
    rec = app.state.recommender
    policy = rec.policy
    ids, mask = policy.encode_prompts([[policy.catalog.sid_of(4), policy.catalog.sid_of(5)]])
    initial = ved_search(policy.model, rec.value_head, policy.trie, ids, mask, VEDConfig(7, deadline=0.0))
    expected = [sid_to_str(policy.catalog.sids[i]) for i in initial.decode.ranked()[0]]
    assert [it["sid"] for it in body["items"]] == expected


def test_cap_binds_on_a_slow_model(app: FastAPI, client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    model = app.state.recommender.policy.model
    forward = model.forward

    def slow_forward(*args: Any, **kwargs: Any) -> Any:  # every backbone call costs >= 20 ms
        time.sleep(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow_forward)
    body = {"history": [6, 7], "k": 5, "mode": "ved", "budget": 2000}
    capped = client.post("/recommend", json=body | {"latency_ms": 150}).json()
    assert capped["cap_hit"] is True and len(capped["items"]) == 5
    assert capped["search"]["iterations"] > 0  # the loop ran, then the cap stopped it
    # one step past the deadline at most: a 20 ms forward plus generous slack for a loaded CI machine
    assert capped["server_time_ms"] < 150 + 150
    uncapped = client.post("/recommend", json=body | {"latency_ms": 1000}).json()
    assert uncapped["search"]["tokens_spent"] > capped["search"]["tokens_spent"]


def test_concurrent_ved_requests_share_a_search_and_its_earliest_deadline(
    app: FastAPI, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    batcher = app.state.recommender.batcher
    original = batcher.run
    seen: list[tuple[Hashable, int]] = []

    def spy(key: Hashable, jobs: Sequence[Any]) -> Sequence[Any]:
        seen.append((key, len(jobs)))
        return original(key, jobs)

    monkeypatch.setattr(batcher, "run", spy)
    monkeypatch.setattr(batcher, "max_wait_s", 0.3)
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client.post, "/recommend",
                               json={"history": [i + 1], "k": 4, "mode": "ved", "latency_ms": 900}) for i in range(3)]
        bodies = [f.result().json() for f in futures]
    assert all(len(b["items"]) == 4 for b in bodies)
    assert any(isinstance(key, VEDConfig) and size > 1 for key, size in seen)


@pytest.mark.parametrize(("body", "field"), [
    ({"history": [1], "mode": "ved", "budget": 5}, "budget"),
    ({"history": [1], "mode": "ved", "budget": 10**6}, "budget"),
    ({"history": [1], "mode": "ved", "latency_ms": 0}, "latency_ms"),
])
def test_bad_ved_parameters_are_422(client: TestClient, body: dict[str, Any], field: str) -> None:
    r = client.post("/recommend", json=body)
    assert r.status_code == 422 and field in r.json()["error"]["message"]
