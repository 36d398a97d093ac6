"""Every endpoint through the app in-process, against the real Redis (DB 15)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from models.sid_catalog import SidCatalog, parse_sid, sid_to_str
from models.ved_config import resolve_budget
from service.app import create_app
from service.history import resolve_entries
from service.redis_store import HISTORY_KEY
from service.schemas import RecommendRequest
from service.settings import Settings


@pytest.fixture(scope="module")
def client(make_settings: Callable[..., Settings], redis_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(redis_url=redis_url))) as c:
        yield c


def metric(client: TestClient, name: str) -> float:
    """Sum of every sample of a metric (all label sets)."""
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_recommend_by_history(client: TestClient, tiny_catalog: SidCatalog) -> None:
    sid = sid_to_str(tiny_catalog.sid_of(7))
    r = client.post("/recommend", json={"history": [3, sid, "12"], "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "beam" and body["cap_hit"] is False and body["search"] is None
    assert len(body["items"]) == 5 and body["history_length"] == 3 and not body["history_truncated"]
    assert body["stored_history"] == "none" and body["model_version"]
    scores = [it["score"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True)
    for it in body["items"]:
        assert it["item_ids"] == tiny_catalog.items_of(tuple(it["sid"].replace("><", ">|<").split("|")))
        assert it["titles"] == [tiny_catalog.items[i].title for i in it["item_ids"]]
    assert r.headers["x-request-id"]


def test_history_is_cut_to_the_prompt_length(client: TestClient) -> None:
    r = client.post("/recommend", json={"history": list(range(15)), "k": 3})
    assert r.status_code == 200 and r.json()["history_truncated"] is True and r.json()["history_length"] == 15


def test_cache_miss_then_hit(client: TestClient) -> None:
    req = {"history": [40, 41, 42], "k": 4}
    hit, miss = 'vstar_cache_lookups_total{result="hit"}', 'vstar_cache_lookups_total{result="miss"}'
    hits, misses = metric(client, hit), metric(client, miss)
    first, second = client.post("/recommend", json=req).json(), client.post("/recommend", json=req).json()
    assert first["cached"] is False and second["cached"] is True
    assert first["items"] == second["items"]
    assert metric(client, hit) == hits + 1 and metric(client, miss) == misses + 1
    # a different k is a different normalised request
    assert client.post("/recommend", json=req | {"k": 5}).json()["cached"] is False


def test_the_cache_key_holds_the_prompts_history_the_exclusion_set_and_a_ved_budget(client: TestClient) -> None:
    """Requests that differ only in what the key normalises away share an entry; any other difference misses."""
    assert isinstance(client.app, FastAPI)
    n = client.app.state.recommender.max_prompt_history
    long = list(range(50, 55 + n))  # longer than the prompt: it sees the last n items
    full = client.post("/recommend", json={"history": long, "k": 4}).json()
    seen = client.post("/recommend", json={"history": long[-n:], "k": 4}).json()
    assert full["history_truncated"] and not full["cached"] and seen["cached"] and seen["items"] == full["items"]
    history = [20, 21, 22]
    assert not client.post("/recommend", json={"history": history, "k": 5}).json()["cached"]
    excluding = client.post("/recommend", json={"history": history, "k": 5, "exclude_history": True}).json()
    assert not excluding["cached"] and not {i for it in excluding["items"] for i in it["item_ids"]} & set(history)
    ved = {"history": [30, 31, 32], "k": 4, "mode": "ved", "latency_ms": 1000}
    assert not client.post("/recommend", json=ved | {"budget": 32}).json()["cached"]
    assert not client.post("/recommend", json=ved | {"budget": 48}).json()["cached"]
    assert client.post("/recommend", json=ved | {"budget": 48}).json()["cached"]


def test_the_ved_cache_key_holds_the_search_settings_the_checkpoint_gives(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model version hashes the weights, the catalog and the fusion, not the VED settings a checkpoint's
    manifest gives (``rl_config.ved_config``): two checkpoints that differ only there must not share entries."""
    assert isinstance(client.app, FastAPI)
    rec = client.app.state.recommender
    req = RecommendRequest(history=[30, 31, 32], k=4, mode="ved", latency_ms=1000)
    events = resolve_entries(rec.catalog, req.history, "history")
    key = rec.cache.key(req, rec.plan(req, events))
    assert rec.cache.key(req, rec.plan(req, events)) == key
    monkeypatch.setattr(rec, "ved_settings", replace(rec.ved_settings, lam=rec.ved_settings.lam + 0.5))
    assert rec.cache.key(req, rec.plan(req, events)) != key
    beam = RecommendRequest(history=[30, 31, 32], k=4)
    assert rec.cache.key(beam, rec.plan(beam, events)) == rec.cache.key(beam, rec.plan(beam, events))


def test_a_ved_entry_serves_any_cap_and_a_budget_given_as_veds_own(client: TestClient) -> None:
    """The cap is not in the key: an answer it did not cut is the whole search's, whatever the cap (one it cut is
    never cached). No budget and VED's own budget for that k are the same search, so one entry."""
    assert isinstance(client.app, FastAPI)
    recommender = client.app.state.recommender
    own = resolve_budget(replace(recommender.ved_settings, num_candidates=4), recommender.catalog.depth)
    ved = {"history": [33, 34, 35], "k": 4, "mode": "ved"}
    first = client.post("/recommend", json=ved | {"latency_ms": 1000}).json()
    assert not first["cached"] and not first["cap_hit"], first
    for other in ({"latency_ms": 900}, {}, {"latency_ms": 1000, "budget": own}):
        again = client.post("/recommend", json=ved | other).json()
        assert again["cached"] and again["items"] == first["items"] and again["search"] == first["search"], other
    assert not client.post("/recommend", json=ved | {"budget": own + 1}).json()["cached"]


def test_an_unreadable_cache_entry_is_a_miss_that_the_answer_replaces(client: TestClient, redis_url: str) -> None:
    """A corrupt entry, or one another layout wrote, costs a search, not a 500."""
    import redis

    req = {"history": [43, 44, 45], "k": 4}
    store = redis.Redis.from_url(redis_url)
    before = set(store.keys("vstar:cache:*"))
    fresh = client.post("/recommend", json=req).json()
    (key,) = set(store.keys("vstar:cache:*")) - before
    for corrupt in [
        b"{not json",
        b'{"items": [{"sid": "x", "extra": 1}], "cap_hit": false, "search": null}',
        # JSON of the layout with a value of another type: the wire response refused it (a 500)
        b'{"items": [{"sid": "x", "item_ids": "1", "titles": [], "score": 0.5}], "cap_hit": false, "search": null}',
        b'{"items": [], "cap_hit": null, "search": null}',
        # an item id this catalog does not hold: served as an item, and a 500 where the catalog has external ids
        b'{"items": [{"sid": "x", "item_ids": [99999999], "titles": ["t"], "score": 0.5}], "cap_hit": false, '
        b'"search": null}',
    ]:
        store.set(key, corrupt)
        r = client.post("/recommend", json=req)
        assert r.status_code == 200 and r.json()["cached"] is False and r.json()["items"] == fresh["items"], r.text
        assert client.post("/recommend", json=req).json()["cached"] is True  # the search's answer replaced it
    store.close()


def test_events_history_and_user_recommendations(client: TestClient, tiny_catalog: SidCatalog) -> None:
    sid = sid_to_str(tiny_catalog.sid_of(9))
    r = client.post("/users/alice/events", json={"items": [1, 2]})
    assert r.status_code == 200 and r.json() == {"user_id": "alice", "appended": 2, "history_length": 2}
    r = client.post("/users/alice/events", json={"items": [sid]})
    assert r.json()["history_length"] == 3
    hist = client.get("/users/alice/history").json()["history"]
    assert [h["item_id"] for h in hist] == [1, 2, None] and hist[2]["sid"] == sid
    assert hist[0]["title"] == tiny_catalog.items[1].title and hist[2]["title"] is None

    by_user = client.post("/recommend", json={"user_id": "alice", "k": 3}).json()
    by_history = client.post("/recommend", json={"history": [1, 2, sid], "k": 3}).json()
    assert by_user["stored_history"] == "used" and by_user["history_length"] == 3
    assert by_user["items"] == by_history["items"]
    both = client.post("/recommend", json={"user_id": "alice", "history": [5], "k": 3}).json()
    assert both["history_length"] == 4
    assert both["items"] == client.post("/recommend", json={"history": [1, 2, sid, 5], "k": 3}).json()["items"]


def test_a_deleted_history_is_gone_and_a_retried_write_is_not_stored_again(client: TestClient) -> None:
    """DELETE answers how many entries went (0 when none: a retry is safe); the user then has no stored history,
    and an event write replayed with its Idempotency-Key stays a replay, so the delete holds."""
    key = {"Idempotency-Key": "del-1"}
    assert client.post("/users/dora/events", json={"items": [1, 2]}, headers=key).status_code == 200
    assert client.post("/users/dora/events", json={"items": [3]}).status_code == 200
    r = client.delete("/users/dora/history")
    assert r.status_code == 200 and r.json() == {"user_id": "dora", "deleted": 3}, r.text
    assert client.get("/users/dora/history").status_code == 404
    assert client.post("/recommend", json={"user_id": "dora", "k": 3}).status_code == 404
    assert client.delete("/users/dora/history").json() == {"user_id": "dora", "deleted": 0}
    replay = client.post("/users/dora/events", json={"items": [1, 2]}, headers=key)
    assert replay.status_code == 200 and replay.headers["Idempotent-Replayed"] == "true"
    assert client.get("/users/dora/history").status_code == 404
    assert client.post("/users/dora/events", json={"items": [4]}).json()["history_length"] == 1  # a new write is
    assert client.delete("/users/has space/history").status_code == 422


def test_a_history_key_of_another_type_is_deleted_and_the_answer_says_so(client: TestClient, redis_url: str) -> None:
    """Another writer's value of another type under a user's history key: the delete's LLEN fails and its DEL
    still runs, so the key is gone; the answer says so (no entries the service could read), not a 503 saying the
    history was not deleted."""
    r = redis.Redis.from_url(redis_url)
    r.set("vstar:history:olga", "not a list")
    answer = client.delete("/users/olga/history")
    assert answer.status_code == 200 and answer.json() == {"user_id": "olga", "deleted": 0}, answer.text
    assert not r.exists("vstar:history:olga")


def test_stored_history_is_capped(make_settings: Callable[..., Settings], clean_redis: str) -> None:
    with TestClient(create_app(make_settings(redis_url=clean_redis, stored_history_max=3))) as c:
        c.post("/users/bob/events", json={"items": [1, 2]})
        assert c.post("/users/bob/events", json={"items": [3, 4]}).json()["history_length"] == 3
        assert [h["item_id"] for h in c.get("/users/bob/history").json()["history"]] == [2, 3, 4]


def test_a_stored_entry_that_is_not_utf8_is_skipped_not_a_500(client: TestClient, redis_url: str) -> None:
    """Another writer left bytes that are no text in a history: the entry is unknown, as a SID the catalog no
    longer has is, and the rest of the history still serves."""
    assert client.post("/users/carol/events", json={"items": [1, 2]}).status_code == 200
    redis.Redis.from_url(redis_url).rpush(HISTORY_KEY.format("carol"), b"\xff\xfe")
    r = client.get("/users/carol/history")
    assert r.status_code == 200 and [h["item_id"] for h in r.json()["history"]] == [1, 2], r.text
    r = client.post("/recommend", json={"user_id": "carol", "k": 3})
    assert r.status_code == 200 and r.json()["history_length"] == 2, r.text


def test_exclude_history_drops_seen_items_and_still_returns_k(client: TestClient) -> None:
    plain = client.post("/recommend", json={"history": [10], "k": 6}).json()["items"]
    seen = [i for it in plain[:3] for i in it["item_ids"]]
    r = client.post("/recommend", json={"history": [10, *seen], "k": 6, "exclude_history": True}).json()
    assert len(r["items"]) == 6
    assert not {i for it in r["items"] for i in it["item_ids"]} & set(seen + [10])


@pytest.mark.parametrize("mode", ["beam", "ved"])
def test_exclude_items_never_come_back_and_k_still_does(
    client: TestClient, tiny_catalog: SidCatalog, mode: str
) -> None:
    """The request's own exclusions (an item, and a SID: all its items), beside or without exclude_history; an item
    the catalog does not know is passed over. The key holds the exclusions: a request that adds them is no hit."""
    body = {"history": [11, 12], "k": 6, "mode": mode}
    plain = client.post("/recommend", json=body).json()["items"]
    first, second = plain[0]["item_ids"][0], plain[1]["sid"]
    blocked = {first, *tiny_catalog.items_of(parse_sid(second))}
    for history_too in [False, True]:
        exclusions = body | {"exclude_history": history_too, "exclude_items": [first, second, 99999]}
        r = client.post("/recommend", json=exclusions)
        assert r.status_code == 200 and not r.json()["cached"], r.text
        items = r.json()["items"]
        assert len(items) == 6 and second not in {it["sid"] for it in items}
        assert not {i for it in items for i in it["item_ids"]} & (blocked | ({11, 12} if history_too else set()))
        again = client.post("/recommend", json=exclusions).json()
        assert again["cached"] and again["items"] == items


def test_items_health_ready_metrics(client: TestClient, tiny_catalog: SidCatalog) -> None:
    r = client.get("/items/4")
    item = {"item_id": 4, "sid": sid_to_str(tiny_catalog.sid_of(4)), "title": tiny_catalog.items[4].title}
    assert r.json() == item | {"external_id": None}  # the checkpoint has no external ids
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready" and ready.json()["redis"] == "ok"
    text = client.get("/metrics").text
    for name in (
        "vstar_recommend_requests_total",
        "vstar_recommend_latency_seconds_bucket",
        "vstar_beam_batch_size",
        "vstar_beam_between_ved_total",
        "vstar_cache_lookups_total",
        "vstar_ved_cap_hits_total",
        "vstar_ved_tokens_spent",
    ):
        assert name in text


def test_in_process_stores_without_redis(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings())) as c:
        assert c.get("/readyz").json()["redis"] == "not_configured"
        c.post("/users/carol/events", json={"items": [7]})
        r = c.post("/recommend", json={"user_id": "carol", "k": 2})
        assert r.status_code == 200 and r.json()["stored_history"] == "used"
        assert c.post("/recommend", json={"user_id": "carol", "k": 2}).json()["cached"] is True


BAD_REQUESTS = [
    ({"history": [1], "k": 0}, "k"),
    ({"history": [1], "k": 101}, "k"),
    ({"history": [1], "k": "10"}, "k"),
    ({"history": [1], "k": 2.5}, "k"),
    ({"history": [1], "k": True}, "k"),
    ({"history": [1], "mode": "greedy"}, "mode"),
    ({"history": [1], "mode": "ved", "budget": 0}, "budget"),
    ({"history": [1], "mode": "ved", "latency_ms": 100000}, "latency_ms"),
    ({"history": [1], "budget": 64}, "budget"),  # beam has none: it said "body: budget applies to mode 'ved' only"
    ({"history": [1], "mode": "beam", "latency_ms": 100}, "latency_ms"),
    ({"history": [1, 99999]}, "history: unknown item ids [99999]"),
    ({"history": ["<a_1><b_2>", "nope"]}, "history: malformed SIDs ['<a_1><b_2>', 'nope']"),
    ({"history": ["<a_0><b_0><c_999>"]}, "history: SIDs not in the catalog"),
    ({"history": "1,2"}, "history"),
    ({"history": [[1]]}, "history"),
    ({"history": []}, "history"),
    ({"history": list(range(101))}, "history"),
    ({}, "history"),
    ({"k": 3}, "history"),
    ({"history": [1], "colour": "red"}, "colour"),
    ({"history": [1], "exclude_items": ["<a_1><b_2>"]}, "exclude_items: malformed SIDs ['<a_1><b_2>']"),
    ({"history": [1], "exclude_items": "1,2"}, "exclude_items"),
    ({"history": [1], "exclude_items": [1.5]}, "exclude_items"),
    ({"history": [1], "exclude_items": list(range(101))}, "exclude_items"),
    ({"user_id": "", "history": [1]}, "user_id"),
    ({"user_id": "has space"}, "user_id"),
]


@pytest.mark.parametrize(("body", "names"), BAD_REQUESTS)
def test_bad_input_is_422_naming_the_field(client: TestClient, body: dict, names: str) -> None:
    r = client.post("/recommend", json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    message = err["message"]
    assert err["type"] == "invalid_request" and message.removeprefix("body.").startswith(names), message
    assert message.removeprefix("body.")[len(names)] in ":. (", message  # the field's whole name, not a prefix


def test_unknown_user_without_history_is_404(client: TestClient) -> None:
    r = client.post("/recommend", json={"user_id": "nobody", "k": 3})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    assert r.json()["error"]["message"].startswith("user_id:")
    assert client.get("/users/nobody/history").status_code == 404


def test_an_empty_history_beside_a_user_id_reads_the_stored_one(client: TestClient) -> None:
    assert client.post("/users/erin/events", json={"items": [1, 2]}).status_code == 200
    r = client.post("/recommend", json={"user_id": "erin", "history": [], "k": 3})
    assert r.status_code == 200 and r.json()["stored_history"] == "used" and len(r.json()["items"]) == 3
    r = client.post("/recommend", json={"user_id": "nobody", "history": [], "k": 3})
    assert r.status_code == 404 and r.json()["error"]["message"].startswith("user_id:")


def test_other_errors_share_the_error_body(client: TestClient) -> None:
    assert client.post("/users/dave/events", json={"items": [123456]}).json()["error"]["message"].startswith("items:")
    assert client.post("/users/dave/events", json={"items": []}).status_code == 422
    assert client.get("/items/abc").status_code == 422
    missing = client.get("/items/100000")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    assert client.get("/nowhere").json() == {"error": {"type": "not_found", "message": "Not Found"}}
    assert client.get("/recommend").json()["error"]["type"] == "method_not_allowed"
    bad_json = client.post("/recommend", content=b"{", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request"


@pytest.mark.parametrize("text", ["%C2%855", "%205", "5%20", "+5", "5_0", "--5", "%D9%A5"])
def test_item_id_in_the_path_is_the_integer_itself(client: TestClient, text: str) -> None:
    # lax int parsing would serve item 5 (or 50) for these; found by the schema fuzz test ("\x85" then "5")
    r = client.get(f"/items/{text}")
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("path.item_id:"), r.text


def test_item_id_with_leading_zeros_is_that_item(client: TestClient) -> None:
    assert client.get("/items/05").json()["item_id"] == 5


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b'{"history": [' + b"7" * 5000 + b"]}", "an integer of more than 4300 digits"),
        (b'{"history": ' + b"[" * 5000 + b"]" * 5000 + b"}", "arrays and objects nested deeper than the JSON reader"),
        (b'{"history": ["\xff"]}', "not UTF-8 text (byte 14)"),
    ],
)
def test_a_body_json_cannot_read_is_400_saying_why(client: TestClient, body: bytes, why: str) -> None:
    r = client.post("/recommend", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request", r.text
    assert r.json()["error"]["message"].startswith(f"body: cannot be read as JSON: {why}"), r.text


@pytest.mark.parametrize("path", ["/recommend", "/users/u1/events"])
def test_an_empty_body_is_400_not_a_missing_field(client: TestClient, path: str) -> None:
    r = client.post(path, content=b"", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == {
        "type": "invalid_request",
        "message": "body: not valid JSON: the body is empty",
    }, r.text


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"history": [1', "body: not valid JSON at character 14: Expecting"),
        (b'{"history": [1,], "k": 3}', "body: not valid JSON at character 15: Expecting value"),
    ],
)
def test_a_body_that_is_not_json_is_400_naming_where_reading_stopped(
    client: TestClient, body: bytes, message: str
) -> None:
    r = client.post("/recommend", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request", r.text
    assert r.json()["error"]["message"].startswith(message), r.text


def test_the_margins_in_force_are_scraped_from_the_start(make_settings: Callable[..., Settings]) -> None:
    """The VED deadline margin and cap lateness gauges read the values in force at each scrape (they read 0.0
    until a report came, and kept a report's value after it expired)."""
    with TestClient(create_app(make_settings(ved_margin_ms=7.0))) as c:
        text = c.get("/metrics").text
    assert "vstar_ved_deadline_margin_seconds 0.007" in text, text
    assert "vstar_ved_cap_lateness_seconds 0.0" in text
    # the margin counts back from the hard cap's last chance, not from the cap (respond and lateness are not in it)
    assert "# HELP vstar_ved_deadline_margin_seconds How much earlier than the hard cap's last chance" in text


def test_oversized_bodies_get_413(client: TestClient) -> None:
    big = b'{"history": [' + b"1," * 40000 + b"1]}"
    r = client.post("/recommend", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit counts streamed bytes
        yield b'{"history": ['
        for _ in range(100):
            yield b"1," * 500
        yield b"1]}"

    r = client.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"


def test_unexpected_errors_are_500_without_a_trace(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(make_settings())
    with TestClient(app) as c:

        def boom(*args: object) -> None:
            raise RuntimeError("secret internals")

        monkeypatch.setattr(app.state.recommender.batcher, "run", boom)
        r = c.post("/recommend", json={"history": [1]}, headers={"x-request-id": "req-42"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "req-42"
    assert r.json() == {"error": {"type": "internal_error", "message": "internal server error (request id req-42)"}}
    assert "secret" not in r.text
    logged = [rec for rec in caplog.records if rec.name == "service.errors"]
    assert logged and logged[0].exc_info is not None and logged[0].__dict__["request_id"] == "req-42"


def test_limits_come_from_settings(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(max_k=7, default_k=5, max_request_history=4, ved_max_latency_ms=300, max_request_exclude=2)
    with TestClient(create_app(settings)) as c:
        schema = c.get("/openapi.json").json()["components"]["schemas"]["RecommendRequest"]["properties"]
        assert schema["k"]["maximum"] == 7 and schema["history"]["anyOf"][0]["maxItems"] == 4
        assert schema["exclude_items"]["anyOf"][0]["maxItems"] == 2
        assert c.post("/recommend", json={"history": [1], "exclude_items": [2, 3, 4]}).status_code == 422
        assert c.post("/recommend", json={"history": [1], "exclude_items": [2, 3]}).status_code == 200
        assert c.post("/recommend", json={"history": [1], "k": 8}).status_code == 422
        assert c.post("/recommend", json={"history": [1, 2, 3, 4, 5]}).status_code == 422
        assert c.post("/recommend", json={"history": [1], "mode": "ved", "latency_ms": 301}).status_code == 422
        assert c.post("/recommend", json={"history": [1], "k": 7}).status_code == 200


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_every_asset_from_this_server(client: TestClient, page: str) -> None:
    html = client.get(page).text
    urls = re.findall(r"""(?:src|href|spec-url)=["']([^"']+)["']|url: ?["']([^"']+)["']""", html)
    urls = [a or b for a, b in urls]
    assert "/openapi.json" in urls and any(u.endswith(".js") for u in urls), html
    for url in urls:
        assert url.startswith("/"), f"{page} loads {url} from elsewhere: blank without a network"
        answer = client.get(url)
        assert answer.status_code == 200 and len(answer.content) > 1000, url


def test_requests_never_hop_to_a_worker_thread(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, tiny_catalog: SidCatalog
) -> None:
    """Only the model runs off the event loop: FastAPI sends a plain ``def`` handler or dependency to
    anyio's thread pool, and that hop per request (a thread wake-up, the GIL handed back and forth) starved
    the loop under load, so VED's hard-cap timer fired late."""
    import anyio.to_thread

    hops: list[object] = []
    run_sync = anyio.to_thread.run_sync

    async def counting_run_sync(func: Callable[..., object], *args: object, **kwargs: object) -> object:
        hops.append(func)
        return await run_sync(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting_run_sync)
    sid = sid_to_str(tiny_catalog.sid_of(2))
    assert client.post("/users/hop/events", json={"items": [1, sid]}).status_code == 200
    assert client.post("/recommend", json={"user_id": "hop", "k": 2}).status_code == 200
    assert client.post("/recommend", json={"history": [1], "k": 2, "mode": "ved", "latency_ms": 500}).status_code == 200
    assert client.get("/users/hop/history").status_code == 200
    assert client.get("/items/1").status_code == 200 and client.get("/readyz").status_code == 200
    assert hops == []


def test_a_huge_unknown_field_name_is_not_echoed_whole(client: TestClient) -> None:
    r = client.post("/recommend", json={"history": [1], "x" * 50_000: 1})
    assert r.status_code == 422 and len(r.content) < 1000, len(r.content)
    assert r.json()["error"]["message"].startswith("body.xxxxxxxx") and "..." in r.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/recommend", "/users/cy/events"])
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_that_is_not_declared_json_is_415_naming_the_content_type(
    client: TestClient, path: str, content_type: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    r = client.post(path, content=b'{"history": [1], "items": [1]}', headers=headers)
    assert r.status_code == 415 and r.json()["error"]["type"] == "unsupported_media_type", r.text
    assert r.json()["error"]["message"].startswith("content-type:")
    assert (content_type or "missing") in r.json()["error"]["message"]
    assert client.post(path, json={"history": [1], "items": [1]}).status_code != 415
    ok = client.post(
        path, content=b'{"history": [1], "items": [1]}', headers={"content-type": "application/json; charset=utf-8"}
    )
    assert ok.status_code != 415
