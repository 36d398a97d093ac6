"""External ids through the API: answers carry the items' own ids, requests may name items by them, and a
checkpoint without them answers as before (null), against the real Redis (DB 15)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from models.checkpoint import save_checkpoint
from models.policy import Policy
from models.sid_catalog import SidCatalog, sid_to_str
from service.app import create_app
from service.settings import Settings


def sku(item_id: int) -> str:
    # a slash, a space, a character outside ASCII and one a URL must escape: the path route takes them all
    return "Grün #0/a b" if item_id == 0 else f"SKU/{item_id:03d}"


@pytest.fixture(scope="module")
def named_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_policy: Policy) -> Path:
    catalog = tiny_policy.catalog.with_external_ids({i: sku(i) for i in tiny_policy.catalog.items})
    named = Policy(tiny_policy.model, tiny_policy.tokenizer, catalog, tiny_policy.prompt)
    return save_checkpoint(tmp_path_factory.mktemp("named") / "ckpt", named, manifest={"note": "external ids"})


@pytest.fixture(scope="module")
def client(make_settings: Callable[..., Settings], redis_url: str, named_checkpoint: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(checkpoint=named_checkpoint, redis_url=redis_url))) as c:
        yield c


@pytest.fixture(scope="module")
def plain(make_settings: Callable[..., Settings], redis_url: str) -> Iterator[TestClient]:
    """The service of a checkpoint without external ids (every checkpoint written before them)."""
    with TestClient(create_app(make_settings(redis_url=redis_url))) as c:
        yield c


def test_answers_carry_each_items_external_id(client: TestClient) -> None:
    r = client.post("/recommend", json={"history": [3, 4, 5], "k": 5})
    assert r.status_code == 200, r.text
    for it in r.json()["items"]:
        assert it["external_ids"] == [sku(i) for i in it["item_ids"]] and it["item_ids"]


def test_a_history_by_external_id_is_the_history_by_item_id(client: TestClient, tiny_catalog: SidCatalog) -> None:
    """Resolved before the cache key is made: the two requests share one entry (the second is a hit)."""
    by_id = client.post("/recommend", json={"history": [60, 61, 0], "k": 4}).json()
    named = [{"external_id": sku(60)}, {"external_id": sku(61)}, {"external_id": sku(0)}]
    by_external = client.post("/recommend", json={"history": named, "k": 4}).json()
    assert not by_id["cached"] and by_external["cached"] and by_external["items"] == by_id["items"]
    mixed = [{"external_id": sku(60)}, "61", sid_to_str(tiny_catalog.sid_of(0))]  # forms mix in one history
    r = client.post("/recommend", json={"history": mixed, "k": 4})
    assert r.status_code == 200 and r.json()["history_length"] == 3, r.text


def test_events_by_external_id_are_stored_and_read_back_with_it(client: TestClient, tiny_catalog: SidCatalog) -> None:
    sid = sid_to_str(tiny_catalog.sid_of(9))
    r = client.post("/users/xavier/events", json={"items": [{"external_id": sku(1)}, 2, sid]})
    assert r.status_code == 200 and r.json()["appended"] == 3, r.text
    history = client.get("/users/xavier/history").json()["history"]
    assert [(h["item_id"], h["external_id"]) for h in history] == [(1, sku(1)), (2, sku(2)), (None, None)]
    by_user = client.post("/recommend", json={"user_id": "xavier", "k": 3}).json()
    assert by_user["items"] == client.post("/recommend", json={"history": [1, 2, sid], "k": 3}).json()["items"]


@pytest.mark.parametrize(("path", "field"), [("/recommend", "history"), ("/users/yves/events", "items")])
def test_an_unknown_external_id_is_a_422_naming_it(client: TestClient, path: str, field: str) -> None:
    body = [{"external_id": "nope"}, 3, {"external_id": "SKU/999"}, 99999]
    r = client.post(path, json={field: body})
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request", r.text
    assert r.json()["error"]["message"] == (
        f"{field}: unknown item ids [99999] (1); unknown external ids ['nope', 'SKU/999'] (2)"
    )
    assert client.get("/users/yves/history").status_code == 404  # nothing of a refused write is stored


def test_external_ids_sent_bare_are_named_with_the_form_they_take(client: TestClient) -> None:
    """A string of digits is an item id and any other string a SID, even where it is also an external id."""
    r = client.post("/recommend", json={"history": ["SKU/004", 4]})
    assert r.status_code == 422 and r.json()["error"]["message"].endswith(
        """; ['SKU/004'] (1) are external ids: send each as {"external_id": ...}"""
    ), r.text


@pytest.mark.parametrize(
    "entry",
    [{"external_id": ""}, {"external_id": 5}, {"external_id": "SKU/001", "title": "x"}, {"sku": "SKU/001"}, {}],
)
def test_a_malformed_external_id_object_is_a_422_naming_the_field(client: TestClient, entry: dict) -> None:
    r = client.post("/recommend", json={"history": [1, entry]})
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("body.history.1"), r.text


def test_items_by_id_and_by_external_id(client: TestClient, tiny_catalog: SidCatalog) -> None:
    four = {"item_id": 4, "sid": sid_to_str(tiny_catalog.sid_of(4)), "title": "item 4", "external_id": sku(4)}
    assert client.get("/items/4").json() == four
    assert client.get("/items/external/SKU/004").json() == four  # the id's slash is part of it
    assert client.get("/items/external/SKU%2F004").json() == four
    assert client.get(f"/items/external/{quote(sku(0))}").json()["item_id"] == 0
    missing = client.get("/items/external/SKU/999")
    assert missing.status_code == 404 and missing.json()["error"] == {
        "type": "not_found",
        "message": "external_id: unknown external id 'SKU/999'",
    }
    assert client.get("/items/external/").json()["error"]["message"] == "external_id: unknown external id ''"
    none = client.get("/items/external")  # not read as the item id "external"
    assert none.status_code == 404 and none.json()["error"]["message"].startswith("external_id: none given")


def test_without_external_ids_answers_are_as_before_with_null(plain: TestClient) -> None:
    r = plain.post("/recommend", json={"history": [3, 4, 5], "k": 3})
    assert r.status_code == 200 and all(it["external_ids"] is None for it in r.json()["items"]), r.text
    assert plain.post("/users/zoe/events", json={"items": [1]}).status_code == 200
    assert plain.get("/users/zoe/history").json()["history"][0]["external_id"] is None
    assert plain.get("/items/4").json()["external_id"] is None


def test_without_external_ids_naming_one_says_the_checkpoint_has_none(plain: TestClient) -> None:
    r = plain.post("/recommend", json={"history": [{"external_id": "SKU/001"}]})
    assert r.status_code == 422 and r.json()["error"]["message"] == (
        "history: external ids ['SKU/001'] (1) given, but this checkpoint's catalog has none (it was trained on data "
        "without item_map.json): name the items by item id or SID"
    )
    missing = plain.get("/items/external/SKU/001")
    assert missing.status_code == 404
    assert missing.json()["error"]["message"].endswith("(this checkpoint's catalog has no external ids)")


def test_the_schema_documents_the_object_form_and_the_new_keys(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    assert components["ExternalItemRef"]["required"] == ["external_id"]
    entries = components["RecommendRequest"]["properties"]["history"]["anyOf"][0]["items"]["oneOf"]
    assert {"$ref": "#/components/schemas/ExternalItemRef"} in entries
    for model, key in (
        ("RecommendedItem", "external_ids"),
        ("HistoryItem", "external_id"),
        ("ItemResponse", "external_id"),
    ):
        assert key in components[model]["required"] and components[model]["properties"][key]["description"]
    assert "/items/external/{external_id}" in schema["paths"]
