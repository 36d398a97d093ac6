"""Constrained beam search: contracts, and equality with HF generate (the reference)."""

from __future__ import annotations

import random

import pytest
import torch

from models.backbone import cache_kwargs
from models.beam_search import BeamSearchConfig, beam_search
from models.hf_beam_search import hf_beam_search
from models.policy import Policy


def histories(policy: Policy, n: int, seed: int) -> list:
    rng = random.Random(seed)
    ids = sorted(policy.catalog.items)
    return [[policy.catalog.sid_of(rng.choice(ids)) for _ in range(rng.randrange(1, 9))] for _ in range(n)]


@pytest.mark.parametrize("k", [2, 5, 20])
def test_matches_hf_generate(tiny_policy: Policy, k: int) -> None:
    ids, mask = tiny_policy.encode_prompts(histories(tiny_policy, 6, k))
    ours = beam_search(tiny_policy.model, tiny_policy.trie, ids, mask, BeamSearchConfig(k))
    ref = hf_beam_search(tiny_policy.model, tiny_policy.trie, ids, mask, BeamSearchConfig(k))
    assert torch.equal(ours.sid_index, ref.sid_index)
    finite = torch.isfinite(ref.scores)
    torch.testing.assert_close(ours.scores[finite], ref.scores[finite], rtol=1e-5, atol=1e-5)


def test_every_output_is_a_catalog_sid_and_sorted(tiny_policy: Policy) -> None:
    ids, mask = tiny_policy.encode_prompts(histories(tiny_policy, 4, 0))
    res = beam_search(tiny_policy.model, tiny_policy.trie, ids, mask, BeamSearchConfig(30))
    assert res.sid_index.shape == (4, 30) and res.token_ids.shape == (4, 30, 3)
    for row, scores, toks in zip(res.sid_index.tolist(), res.scores, res.token_ids, strict=False):
        valid = [s for s in row if s >= 0]
        assert len(valid) == len(set(valid)) == 30
        assert torch.all(scores[:-1] >= scores[1:])
        for s, t in zip(row, toks.tolist(), strict=False):
            assert tuple(tiny_policy.tokenizer.convert_ids_to_tokens(t)) == tiny_policy.catalog.sids[s]


def test_batched_equals_one_by_one(tiny_policy: Policy) -> None:
    hs = histories(tiny_policy, 5, 3)
    ids, mask = tiny_policy.encode_prompts(hs)
    batched = beam_search(tiny_policy.model, tiny_policy.trie, ids, mask, BeamSearchConfig(10))
    for i, h in enumerate(hs):
        one_ids, one_mask = tiny_policy.encode_prompts([h])
        single = beam_search(tiny_policy.model, tiny_policy.trie, one_ids, one_mask, BeamSearchConfig(10))
        assert single.sid_index[0].tolist() == batched.sid_index[i].tolist()
        torch.testing.assert_close(single.scores[0], batched.scores[i], rtol=1e-4, atol=1e-4)


def test_more_beams_than_sids_pads_with_invalid(tiny_policy: Policy) -> None:
    n = len(tiny_policy.catalog.sids)
    ids, mask = tiny_policy.encode_prompts(histories(tiny_policy, 2, 1))
    res = beam_search(tiny_policy.model, tiny_policy.trie, ids, mask, BeamSearchConfig(n + 7))
    for row in res.ranked():
        assert sorted(row) == list(range(n))
    assert torch.all(res.sid_index[:, n:] == -1) and torch.all(torch.isinf(res.scores[:, n:]))


def test_a_width_far_beyond_the_sids_searches_only_as_many(tiny_policy: Policy) -> None:
    n = len(tiny_policy.catalog.sids)  # 200,000 beams would need a (K, K) mask of 160 GB
    ids, mask = tiny_policy.encode_prompts(histories(tiny_policy, 2, 1))
    exact = beam_search(tiny_policy.model, tiny_policy.trie, ids, mask, BeamSearchConfig(n))
    wide = beam_search(tiny_policy.model, tiny_policy.trie, ids, mask, BeamSearchConfig(200_000))
    assert wide.sid_index.shape == (2, 200_000) and wide.token_ids.shape == (2, 200_000, tiny_policy.trie.depth)
    assert torch.equal(wide.sid_index[:, :n], exact.sid_index) and torch.equal(wide.scores[:, :n], exact.scores)
    assert torch.all(wide.sid_index[:, n:] == -1) and torch.all(wide.token_ids[:, n:] == -1)


def test_rejects_zero_beams() -> None:
    with pytest.raises(ValueError, match="num_beams"):
        BeamSearchConfig(0)


def test_cache_goes_under_the_keyword_the_model_takes() -> None:
    """transformers renamed ``past_key_values`` to ``cache``; a wrong name would be swallowed by ``**kwargs``."""

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs):  # noqa: ANN001, ANN003, ANN202
            return past_key_values

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, **kwargs):  # noqa: ANN001, ANN003, ANN202
            return cache

    marker = object()
    for model in (Old(), New()):
        assert model(input_ids=None, **cache_kwargs(model, marker)) is marker
