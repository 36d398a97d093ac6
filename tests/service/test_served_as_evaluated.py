"""The served model is the one evaluated: row by row, ``/recommend`` answers what ``vstar eval`` ranks.

For the rows of a split (the tiny data set's test rows, and rows whose history
is longer than the model's prompt window), the service's top k (cache off,
exclusion off) must be the ranked list that ``vstar eval``'s decoder gives the
same row, through eval's own path (``rank_samples``: prompts from the rows'
item ids, batched by length, left-padded), for beam search and for VED. The
checkpoint has what a trained one has: transition counts with a fusion weight,
a value head and the VED settings its RL run trained with (exploratory slots
among them, which both leave out of a ranked list).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from models.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
from models.policy import Policy
from models.sid_catalog import sid_to_str
from models.transition import STATE_NAME, TransitionCounts, checkpoint_fusion
from models.value_head import value_head_for, value_head_manifest
from models.ved_config import VEDConfig
from service.app import create_app
from service.settings import Settings
from training.data.dataset import RecDataset, Sample
from training.evaluation.decoders import make_decoder
from training.evaluation.evaluate import rank_samples

K = 5
BUDGET = 24  # above VED's least for k = 5 with 8 initial beams (16), below the tiny catalog's 36 prefixes: it searches
TRAINED_VED = VEDConfig(init_beams=8, lam=0.2, beta=0.5, value_weight=0.5, explore_slots=2)


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_policy: Policy, tiny_dataset: RecDataset) -> Path:
    counts = TransitionCounts.fit((s.history, s.target) for s in tiny_dataset.samples(["train", "valid"]))
    torch.manual_seed(1)
    head = value_head_for(tiny_policy)
    manifest = {
        "fusion": {"weight": 2.0},
        "value_head": value_head_manifest(head),
        "rl_config": {"ved_config": {k: v for k, v in vars(TRAINED_VED).items() if k != "num_candidates"}},
    }
    extras = {STATE_NAME: counts.to_state(), "value_head": head.state_dict()}
    return save_checkpoint(tmp_path_factory.mktemp("served") / "ckpt", tiny_policy, manifest, extras)


@pytest.fixture(scope="module")
def loaded(trained_checkpoint: Path) -> LoadedCheckpoint:
    return load_checkpoint(trained_checkpoint)


@pytest.fixture(scope="module")
def rows(tiny_dataset: RecDataset, loaded: LoadedCheckpoint) -> list[Sample]:
    """The test split's rows, and rows longer than the prompt window (their oldest items are cut)."""
    test = tiny_dataset.splits["test"]
    window = loaded.policy.prompt.max_history
    long = [
        Sample(f"long{i}", a.history + b.history + c.history, a.target)
        for i, (a, b, c) in enumerate(zip(test, test[1:], test[2:], strict=False))
    ]
    long = [r for r in long if len(r.history) > window][:8]
    assert len(long) == 8
    return [*test, *long]


@pytest.fixture(scope="module")
def client(make_settings: Callable[..., Settings], trained_checkpoint: Path) -> Iterator[TestClient]:
    settings = make_settings(
        checkpoint=trained_checkpoint, cache_ttl_s=0, batch_max_size=1, exclude_history_default=False
    )
    with TestClient(create_app(settings)) as c:
        yield c


def evaluated(loaded: LoadedCheckpoint, rows: list[Sample], decoder: str, budget: int | None) -> list[list[str]]:
    """``vstar eval --beams K [--decoder ved --budget B]``'s ranked SIDs per row, fused at the checkpoint's weight."""
    decode = make_decoder(loaded, decoder, K, budget, checkpoint_fusion(loaded))
    ranked = rank_samples(loaded.policy, rows, decode, progress=False)
    return [[sid_to_str(loaded.policy.catalog.sids[i]) for i in row] for row in ranked]


def served(client: TestClient, row: Sample, mode: str, budget: int | None) -> list[str]:
    body: dict = {"history": list(row.history), "k": K, "mode": mode, "exclude_history": False}
    if mode == "ved":
        body |= {"budget": budget, "latency_ms": 1000}
    answer = client.post("/recommend", json=body).json()
    if mode == "ved":
        assert answer["cap_hit"] is False and answer["search"]["fallback"] is None, answer["search"]
    return [it["sid"] for it in answer["items"]]


@pytest.mark.parametrize(("mode", "budget"), [("beam", None), ("ved", BUDGET)])
def test_every_row_is_served_as_evaluated(
    client: TestClient, loaded: LoadedCheckpoint, rows: list[Sample], mode: str, budget: int | None
) -> None:
    want = evaluated(loaded, rows, mode, budget)
    got = [served(client, row, mode, budget) for row in rows]
    differ = [(row.history, g, w) for row, g, w in zip(rows, got, want, strict=True) if g != w]
    assert not differ, f"{len(differ)} of {len(rows)} rows differ, e.g. {differ[0]}"
