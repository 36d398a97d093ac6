"""Items no longer offered (``VSTAR_UNAVAILABLE_ITEMS``, ``service.availability``): never recommended by either
decoder, the popularity fallback or the cache, with one line naming the file when it cannot be used."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from models.beam_search import BeamSearchConfig
from models.sid_catalog import SidCatalog, parse_sid, sid_to_str
from service.app import create_app
from service.availability import UnavailableItemsError, read_unavailable
from service.errors import StartupError
from service.history import resolve_entries
from service.schemas import RecommendRequest
from service.settings import Settings
from vstar import app


def shared_and_alone(catalog: SidCatalog) -> tuple[int, int]:
    """A SID several items share, and one naming a single item."""
    shared = next(s for s, items in enumerate(catalog.items_of_sid) if len(items) > 1)
    alone = next(s for s, items in enumerate(catalog.items_of_sid) if len(items) == 1)
    return shared, alone


def offered(answer: dict[str, Any]) -> tuple[set[str], set[int]]:
    return {it["sid"] for it in answer["items"]}, {i for it in answer["items"] for i in it["item_ids"]}


def test_unavailable_items_never_come_back_from_either_decoder(
    make_settings: Callable[..., Settings], tiny_catalog: SidCatalog, tmp_path: Path
) -> None:
    """The SIDs the plain service ranks first, made unavailable: a whole SID (by its item ids), a SID by its
    string, and one item of a shared SID (the SID stays, less that item); a SID left without an item is out of
    the search, so k still come back. The popularity list holds the offered SIDs only."""
    body = {"history": [11, 12, 13], "k": 8}
    with TestClient(create_app(make_settings(cache_ttl_s=0))) as c:
        plain = {mode: c.post("/recommend", json=body | {"mode": mode}).json() for mode in ("beam", "ved")}
    ranked = list(dict.fromkeys(it["sid"] for answer in plain.values() for it in answer["items"]))  # both's first
    whole = [tiny_catalog.sid_index[parse_sid(s)] for s in ranked[:3]]
    shared, _ = shared_and_alone(tiny_catalog)
    gone_items = [i for s in whole[:2] for i in tiny_catalog.items_of_sid[s]] + [tiny_catalog.items_of_sid[shared][0]]
    listed: list[Any] = [*gone_items, sid_to_str(tiny_catalog.sids[whole[2]]), 99999]
    path = tmp_path / "unavailable.json"
    path.write_text(json.dumps(listed))
    gone_sids = {sid_to_str(tiny_catalog.sids[s]) for s in whole}
    with TestClient(create_app(make_settings(cache_ttl_s=0, unavailable_items=path))) as c:
        rec = c.app.state.recommender  # type: ignore[attr-defined]
        assert rec.policy.trie.num_sids == len(tiny_catalog.sids) - 3
        for mode in ("beam", "ved"):
            for extra in ({}, {"exclude_items": [tiny_catalog.items_of_sid[shared][-1]]}):
                answer = c.post("/recommend", json=body | extra | {"mode": mode}).json()
                sids, items = offered(answer)
                assert len(answer["items"]) == 8 and not sids & gone_sids, (mode, answer)
                assert not items & set(gone_items), mode
        popular = [[sid_to_str(s), 10] for s in tiny_catalog.sids]
        order = rec._prior_order(popular).sid_index
        assert len(order) == len(tiny_catalog.sids) - 3 and not set(order) & set(whole)


def test_an_answer_cached_under_another_set_is_a_miss(
    make_settings: Callable[..., Settings], clean_redis: str, tmp_path: Path
) -> None:
    """Replicas started with different files, or a start with a new one, share Redis: the key holds the set."""
    body = {"history": [21, 22], "k": 5}
    with TestClient(create_app(make_settings(redis_url=clean_redis))) as c:
        first = c.post("/recommend", json=body).json()
        assert c.post("/recommend", json=body).json()["cached"]
    path = tmp_path / "unavailable.json"
    path.write_text(json.dumps([first["items"][0]["item_ids"][0]]))
    with TestClient(create_app(make_settings(redis_url=clean_redis, unavailable_items=path))) as c:
        answer = c.post("/recommend", json=body).json()
        assert not answer["cached"] and first["items"][0]["item_ids"][0] not in offered(answer)[1]
        assert c.post("/recommend", json=body).json()["cached"]


def test_a_sid_no_longer_offered_widens_no_request_that_excludes_it(
    make_settings: Callable[..., Settings], tiny_catalog: SidCatalog, tmp_path: Path
) -> None:
    """A request excluding the items of a SID the file took out of the trie (exclude_items, or exclude_history over
    a history that holds them) asks for no extra beam, so a VED budget that fits k is enough; a SID its exclusions
    empty beside the file's items is still searched for on top of k."""
    shared, alone = shared_and_alone(tiny_catalog)
    gone, (partly, *rest) = tiny_catalog.items_of_sid[alone][0], tiny_catalog.items_of_sid[shared]
    path = tmp_path / "unavailable.json"
    path.write_text(json.dumps([gone, partly]))
    body = {"history": [gone], "k": 16, "mode": "ved", "budget": 32, "latency_ms": 900}  # 32 = 2 x max(16, k)
    with TestClient(create_app(make_settings(cache_ttl_s=0, unavailable_items=path))) as c:
        for exclusion in [{"exclude_items": [gone]}, {"exclude_items": [sid_to_str(tiny_catalog.sids[alone])]}]:
            r = c.post("/recommend", json=body | exclusion)
            assert r.status_code == 200 and len(r.json()["items"]) == 16, r.text
        assert c.post("/recommend", json=body | {"exclude_history": True}).status_code == 200
        r = c.post("/recommend", json=body | {"exclude_items": rest})
        assert r.status_code == 422 and "(k=16 plus the 1 SID its exclusions leave without an item)" in r.text
        rec = c.app.state.recommender  # type: ignore[attr-defined]
        request = RecommendRequest(history=[gone], k=5, exclude_history=True, exclude_items=[gone])
        assert rec.plan(request, resolve_entries(tiny_catalog, [gone], "history")).config == BeamSearchConfig(5)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[1, 2", "not JSON"),
        ('{"items": [1]}', 'expected a JSON array of item ids, SID strings or {"external_id": ...} objects'),
        ("[1, 2.5]", "1: expected an item id, a SID string or an"),
        ('[1, "<a_1>"]', "entries: malformed SIDs ['<a_1>'] (1)"),
        ('[{"external_id": "SKU-1"}]', "external ids ['SKU-1'] (1) given, but this checkpoint's catalog has none"),
    ],
)
def test_a_file_that_cannot_be_used_stops_the_start_naming_it(
    make_settings: Callable[..., Settings], tmp_path: Path, text: str, why: str
) -> None:
    path = tmp_path / "unavailable.json"
    path.write_text(text)
    with pytest.raises(StartupError) as raised, TestClient(create_app(make_settings(unavailable_items=path))):
        pass
    assert str(raised.value).startswith(f"VSTAR_UNAVAILABLE_ITEMS={path}: ") and why in str(raised.value)


def test_unknown_entries_are_passed_over_and_a_set_of_every_item_is_refused(
    tiny_catalog: SidCatalog, tmp_path: Path
) -> None:
    path = tmp_path / "unavailable.json"
    path.write_text(json.dumps([99999, "<a_0><b_0><c_99>", 3]))
    unavailable = read_unavailable(path, tiny_catalog)
    assert unavailable.items == {3} and unavailable.unknown == 2 and unavailable.digest is not None
    path.write_text(json.dumps(sorted(tiny_catalog.items)))
    with pytest.raises(UnavailableItemsError, match=r"every one of the catalog's \d+ SIDs would be left without"):
        read_unavailable(path, tiny_catalog)
    with pytest.raises(UnavailableItemsError, match="cannot be read"):
        read_unavailable(tmp_path / "missing.json", tiny_catalog)
    assert read_unavailable(None, tiny_catalog).kept_sids is None


def test_vstar_recommend_leaves_them_out_as_the_service_does(
    make_settings: Callable[..., Settings], tiny_checkpoint: Path, tiny_catalog: SidCatalog, tmp_path: Path
) -> None:
    """The offline command reads the same setting: the service's answers, line for line; a bad file is one line."""
    path = tmp_path / "unavailable.json"
    path.write_text(json.dumps([s for s in range(0, 120, 2)]))
    source = tmp_path / "users.jsonl"
    histories = [[5, 7], [9], [30, 31, 32]]
    source.write_text("".join(json.dumps({"history": h}) + "\n" for h in histories))
    out = tmp_path / "out.jsonl"
    args = ["recommend", "--checkpoint", str(tiny_checkpoint), "--input", str(source), "--out", str(out), "--k", "4"]
    result = CliRunner().invoke(app, args, env={"VSTAR_UNAVAILABLE_ITEMS": str(path)})
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    with TestClient(create_app(make_settings(cache_ttl_s=0, batch_max_size=1, unavailable_items=path))) as c:
        for history, line in zip(histories, lines, strict=True):
            served = c.post("/recommend", json={"history": history, "k": 4}).json()["items"]
            # scores to float32's noise: the command decodes the three histories in one padded batch
            assert [it | {"score": None} for it in line["items"]] == [it | {"score": None} for it in served]
            assert [it["score"] for it in line["items"]] == pytest.approx([it["score"] for it in served], rel=1e-5)
            assert all(i % 2 for i in offered(line)[1])
    path.write_text("[1,")
    result = CliRunner().invoke(app, [*args, "--force"], env={"VSTAR_UNAVAILABLE_ITEMS": str(path)})
    assert result.exit_code == 2 and result.output.startswith(f"Error: VSTAR_UNAVAILABLE_ITEMS={path}: not JSON")
