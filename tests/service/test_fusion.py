"""Shallow fusion as served: answers rank as ``vstar eval`` decodes the checkpoint by default.

A checkpoint with a fusion weight and transition counts (what ``vstar sft`` and
``vstar fuse`` write) is evaluated fused, by beam search and by VED; the service
must answer with that same ranking, not the policy alone.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from models.checkpoint import load_checkpoint, save_checkpoint
from models.node_bonus import NodeBonus
from models.policy import Policy
from models.sid_catalog import SidCatalog, sid_to_str
from models.transition import STATE_NAME, TransitionCounts, checkpoint_fusion
from models.value_head import value_head_for, value_head_manifest
from models.ved_config import VEDConfig
from service.app import create_app
from service.deadline import BatchCost
from service.settings import Settings
from training.evaluation.decoders import DecodeFn, beam_decoder, ved_decoder

WEIGHT = 4.0


def shared_sid_pair(catalog: SidCatalog) -> tuple[int, int]:
    """Two items with one SID (the tiny catalog draws SIDs at random, so some are shared)."""
    by_sid: dict[tuple[str, ...], list[int]] = {}
    for item in sorted(catalog.items):
        by_sid.setdefault(catalog.items[item].sid, []).append(item)
    return next((items[0], items[1]) for items in by_sid.values() if len(items) > 1)


def sole_item(catalog: SidCatalog, besides: set[int]) -> int:
    """An item whose SID names no other item, outside ``besides``."""
    counts = Counter(catalog.items[i].sid for i in catalog.items)
    return next(i for i in sorted(catalog.items) if counts[catalog.items[i].sid] == 1 and i not in besides)


@pytest.fixture(scope="module")
def fused_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_policy: Policy, tiny_catalog: SidCatalog) -> Path:
    a, b = shared_sid_pair(tiny_catalog)
    c = sole_item(tiny_catalog, {3, 5, 7, 11, 13, a, b})
    # a -> item 7, b -> item 11 and c -> item 13, strongly: fused, each leads its row; the policy alone ranks
    # none of them first
    counts = TransitionCounts({a: Counter({7: 50}), b: Counter({11: 50}), c: Counter({13: 50})})
    torch.manual_seed(0)
    head = value_head_for(tiny_policy)
    return save_checkpoint(
        tmp_path_factory.mktemp("fusion") / "ckpt",
        tiny_policy,
        manifest={"fusion": {"weight": WEIGHT}, "value_head": value_head_manifest(head)},
        extras={STATE_NAME: counts.to_state(), "value_head": head.state_dict()},
    )


def evaluated(
    checkpoint: Path,
    history: list[int],
    k: int,
    decoder: str = "beam",
    budget: int | None = None,
    weight: float | None = None,
) -> list[tuple[str, float]]:
    """What ``vstar eval``'s default decoder (fused at the checkpoint's weight, or ``--fusion-weight weight``)
    ranks for ``history``: beam search of width ``k``, or VED (``decoder`` "ved") for ``k`` SIDs within
    ``budget``."""
    loaded = load_checkpoint(checkpoint)
    policy, fusion = loaded.policy, checkpoint_fusion(loaded, weight)
    decode: DecodeFn = beam_decoder(k, fusion) if decoder == "beam" else ved_decoder(loaded, k, budget, 0, fusion)
    ids, mask = policy.encode_prompts([[policy.catalog.sid_of(i) for i in history]])
    res = decode(policy, ids, mask, [history])
    return [
        (sid_to_str(policy.catalog.sids[s]), sc)
        for s, sc in zip(res.sid_index[0].tolist(), res.scores[0].tolist(), strict=True)
        if s >= 0
    ]


def test_beam_answers_are_fused_as_evaluated(
    make_settings: Callable[..., Settings], fused_checkpoint: Path, tiny_catalog: SidCatalog
) -> None:
    a, _ = shared_sid_pair(tiny_catalog)
    history = [3, 5, a]
    want = evaluated(fused_checkpoint, history, 5)
    assert want[0][0] == sid_to_str(tiny_catalog.items[7].sid)  # the counts lead: the test can tell fused apart
    with TestClient(create_app(make_settings(checkpoint=fused_checkpoint, cache_ttl_s=0))) as c:
        got = c.post("/recommend", json={"history": history, "k": 5}).json()["items"]
    assert [it["sid"] for it in got] == [sid for sid, _ in want]
    torch.testing.assert_close(torch.tensor([it["score"] for it in got]), torch.tensor([sc for _, sc in want]))


def test_ved_answers_are_fused_as_evaluated(
    make_settings: Callable[..., Settings], fused_checkpoint: Path, tiny_catalog: SidCatalog
) -> None:
    """VED (a budget below the tiny catalog's 36 prefixes, so it searches) ranks as ``vstar eval --decoder ved``
    does, fused: the transition's target leads, which the policy alone does not rank first."""
    a, _ = shared_sid_pair(tiny_catalog)
    history = [3, 5, a]
    want = evaluated(fused_checkpoint, history, 5, "ved", 34)
    assert want[0][0] == sid_to_str(tiny_catalog.items[7].sid)
    with TestClient(create_app(make_settings(checkpoint=fused_checkpoint, cache_ttl_s=0))) as c:
        body = c.post(
            "/recommend", json={"history": history, "k": 5, "mode": "ved", "budget": 34, "latency_ms": 1000}
        ).json()
    assert body["cap_hit"] is False and body["search"]["iterations"] > 0
    assert [it["sid"] for it in body["items"]] == [sid for sid, _ in want]


def test_ved_fallback_is_the_fused_initial_beam(
    make_settings: Callable[..., Settings],
    fused_checkpoint: Path,
    tiny_catalog: SidCatalog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Too little time for VED's initial tree: the initial beam answers, fused as the tree would have been."""
    a, _ = shared_sid_pair(tiny_catalog)
    history = [3, 5, a]
    with TestClient(create_app(make_settings(checkpoint=fused_checkpoint, cache_ttl_s=0))) as c:
        assert isinstance(c.app, FastAPI)
        monkeypatch.setattr(c.app.state.recommender, "init_cost", BatchCost(start_s=5.0))
        body = c.post("/recommend", json={"history": history, "k": 5, "mode": "ved", "latency_ms": 500}).json()
    assert body["search"]["fallback"] == "initial_beam"
    want = evaluated(fused_checkpoint, history, max(5, VEDConfig().init_beams))[:5]
    assert [it["sid"] for it in body["items"]] == [sid for sid, _ in want]
    assert want[0][0] == sid_to_str(tiny_catalog.items[7].sid)


def test_the_cache_tells_apart_items_that_share_a_sid(
    make_settings: Callable[..., Settings], fused_checkpoint: Path, tiny_catalog: SidCatalog
) -> None:
    """Fused, the last items themselves rank (their transitions), not only their SIDs: one cached answer must
    not be served for another history of the same SIDs."""
    a, b = shared_sid_pair(tiny_catalog)
    with TestClient(create_app(make_settings(checkpoint=fused_checkpoint))) as c:
        first = c.post("/recommend", json={"history": [3, 5, a], "k": 5}).json()
        second = c.post("/recommend", json={"history": [3, 5, b], "k": 5}).json()
    assert second["cached"] is False
    assert second["items"][0]["sid"] == sid_to_str(tiny_catalog.items[11].sid) != first["items"][0]["sid"]


def test_a_sid_that_names_one_item_is_fused_as_that_item(
    make_settings: Callable[..., Settings], fused_checkpoint: Path, tiny_catalog: SidCatalog
) -> None:
    """A history entry given as a SID string that names one item reads as that item's transitions, so the answer
    is the one its item id gets; a SID that several items share names no one item and adds none."""
    a, b = shared_sid_pair(tiny_catalog)
    c = sole_item(tiny_catalog, {3, 5, 7, 11, 13, a, b})  # the fixture's c
    sid = sid_to_str(tiny_catalog.items[c].sid)
    with TestClient(create_app(make_settings(checkpoint=fused_checkpoint, cache_ttl_s=0))) as client:
        by_id, by_sid = ({"history": [3, 5, entry], "k": 5} for entry in (c, sid))
        want = client.post("/recommend", json=by_id).json()["items"]
        got = client.post("/recommend", json=by_sid).json()["items"]
        shared = client.post("/recommend", json={"history": [3, 5, sid_to_str(tiny_catalog.items[a].sid)], "k": 5})
    assert want[0]["sid"] == sid_to_str(tiny_catalog.items[13].sid)  # the counts lead: fused, not the policy's
    assert [(it["sid"], it["score"]) for it in got] == [(it["sid"], it["score"]) for it in want]
    assert shared.json()["items"][0]["sid"] != sid_to_str(tiny_catalog.items[7].sid)  # not a's transitions


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_the_fusion_weight_setting_serves_as_eval_scores_at_that_weight(
    make_settings: Callable[..., Settings], fused_checkpoint: Path, tiny_catalog: SidCatalog, weight: float
) -> None:
    """``VSTAR_FUSION_WEIGHT`` overrides the checkpoint's weight as ``vstar eval --fusion-weight`` does; 0 serves
    the policy alone."""
    a, _ = shared_sid_pair(tiny_catalog)
    history = [3, 5, a]
    want = evaluated(fused_checkpoint, history, 5, weight=weight)
    assert want != evaluated(fused_checkpoint, history, 5)  # another weight ranks otherwise: the test can tell
    with TestClient(create_app(make_settings(checkpoint=fused_checkpoint, cache_ttl_s=0, fusion_weight=weight))) as c:
        got = c.post("/recommend", json={"history": history, "k": 5}).json()["items"]
    assert [it["sid"] for it in got] == [sid for sid, _ in want]
    torch.testing.assert_close(torch.tensor([it["score"] for it in got]), torch.tensor([sc for _, sc in want]))


def test_an_answer_cached_at_one_fusion_weight_is_not_served_at_another(
    make_settings: Callable[..., Settings], fused_checkpoint: Path, tiny_catalog: SidCatalog, redis_url: str
) -> None:
    """Two deployments of one checkpoint at two weights share a Redis: the weight is part of the cache key."""
    a, _ = shared_sid_pair(tiny_catalog)
    req = {"history": [3, 5, a], "k": 5}
    answers = []
    for weight in (WEIGHT, 1.0, WEIGHT):
        settings = make_settings(checkpoint=fused_checkpoint, redis_url=redis_url, fusion_weight=weight)
        with TestClient(create_app(settings)) as c:
            answers.append(c.post("/recommend", json=req).json())
    assert [r["cached"] for r in answers] == [False, False, True]
    assert answers[1]["items"] != answers[0]["items"] == answers[2]["items"]


def test_a_fusion_weight_without_counts_stops_the_start(
    make_settings: Callable[..., Settings], tmp_path: Path, tiny_policy: Policy
) -> None:
    broken = save_checkpoint(tmp_path / "ckpt", tiny_policy, manifest={"fusion": {"weight": WEIGHT}})
    with pytest.raises(Exception, match="transition counts") as stopped:
        with TestClient(create_app(make_settings(checkpoint=broken))):
            pass
    assert "--fusion-weight" not in str(stopped.value)  # vstar eval's option: vstar serve has none
    assert "VSTAR_FUSION_WEIGHT=0 serves the policy alone" in str(stopped.value)
    plain = save_checkpoint(tmp_path / "plain", tiny_policy)  # no weight chosen, no counts: a weight is refused
    with pytest.raises(Exception, match="no transition counts to fuse with at weight 2.0"):
        with TestClient(create_app(make_settings(checkpoint=plain, fusion_weight=2.0))):
            pass
    with TestClient(create_app(make_settings(checkpoint=broken, fusion_weight=0.0))) as c:  # the policy alone
        assert c.post("/recommend", json={"history": [3, 5], "k": 5}).status_code == 200


def test_the_warm_up_times_the_fallbacks_fused_as_served(
    make_settings: Callable[..., Settings], fused_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A served decode computes the fusion's bonus from the history's items (its cost grows with the
    transitions they have), so the learnt costs of VED's initial tree and of the initial beam, which send
    requests to the fallbacks, must include it as timed at warm-up on items with transitions."""
    slow_s = 0.2
    real = TransitionCounts.node_bonus

    def node_bonus(self: TransitionCounts, histories: Any, *args: Any, **kwargs: Any) -> NodeBonus:
        if any(item in self.counts for history in histories for item in history):
            time.sleep(slow_s)  # what reading many transitions costs
        return real(self, histories, *args, **kwargs)

    monkeypatch.setattr(TransitionCounts, "node_bonus", node_bonus)
    with TestClient(create_app(make_settings(checkpoint=fused_checkpoint, cache_ttl_s=0, batch_max_size=1))) as c:
        assert isinstance(c.app, FastAPI)
        rec = c.app.state.recommender
        assert rec.init_cost.cost_s(1) >= slow_s and rec.beam_cost.cost_s(1) >= slow_s
