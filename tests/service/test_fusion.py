"""Shallow fusion as served: beam answers rank as ``vstar eval`` decodes the checkpoint by default.

A checkpoint with a fusion weight and transition counts (what ``vstar sft`` and
``vstar fuse`` write) is evaluated fused; the service must answer with that same
ranking, not the policy alone. VED stays unfused, as ``vstar eval --decoder ved``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from models.checkpoint import load_checkpoint, save_checkpoint
from models.policy import Policy
from models.sid_catalog import SidCatalog, sid_to_str
from models.transition import STATE_NAME, TransitionCounts, checkpoint_fusion
from service.app import create_app
from service.settings import Settings
from training.evaluation.decoders import beam_decoder

WEIGHT = 4.0


def shared_sid_pair(catalog: SidCatalog) -> tuple[int, int]:
    """Two items with one SID (the tiny catalog draws SIDs at random, so some are shared)."""
    by_sid: dict[tuple[str, ...], list[int]] = {}
    for item in sorted(catalog.items):
        by_sid.setdefault(catalog.items[item].sid, []).append(item)
    return next((items[0], items[1]) for items in by_sid.values() if len(items) > 1)


@pytest.fixture(scope="module")
def fused_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_policy: Policy, tiny_catalog: SidCatalog) -> Path:
    a, b = shared_sid_pair(tiny_catalog)
    # a -> item 7 and b -> item 11, strongly: fused, each leads its row; the policy alone ranks neither first
    counts = TransitionCounts({a: Counter({7: 50}), b: Counter({11: 50})})
    return save_checkpoint(
        tmp_path_factory.mktemp("fusion") / "ckpt",
        tiny_policy,
        manifest={"fusion": {"weight": WEIGHT}},
        extras={STATE_NAME: counts.to_state()},
    )


def evaluated(checkpoint: Path, history: list[int], k: int) -> list[tuple[str, float]]:
    """What ``vstar eval``'s default beam decoder ranks for ``history``."""
    loaded = load_checkpoint(checkpoint)
    policy = loaded.policy
    ids, mask = policy.encode_prompts([[policy.catalog.sid_of(i) for i in history]])
    res = beam_decoder(k, checkpoint_fusion(loaded))(policy, ids, mask, [history])
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


def test_a_fusion_weight_without_counts_stops_the_start(
    make_settings: Callable[..., Settings], tmp_path: Path, tiny_policy: Policy
) -> None:
    broken = save_checkpoint(tmp_path / "ckpt", tiny_policy, manifest={"fusion": {"weight": WEIGHT}})
    with pytest.raises(Exception, match="transition counts"), TestClient(create_app(make_settings(checkpoint=broken))):
        pass
