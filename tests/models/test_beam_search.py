"""Constrained beam search: contracts, and equality with HF generate (the reference)."""

from __future__ import annotations

import random

import pytest
import torch

from models.backbone import cache_kwargs
from models.beam_search import BeamSearchConfig, beam_search
from models.hf_beam_search import hf_beam_search
from models.policy import Policy
from models.sid_catalog import SidCatalog
from models.sid_trie import SidTrie


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


def brute_force(policy: Policy, hists: list) -> torch.Tensor:
    """(B, SIDs): every catalog SID's summed log-prob after each prompt, fed alone (no padding) with the SID's
    tokens after it: the scores exhaustive search ranks by."""
    depth = policy.catalog.depth
    rows = []
    for h in hists:
        prompt = policy.prompt.encode(policy.tokenizer, h)
        sids = torch.tensor([policy.tokenizer.convert_tokens_to_ids(list(s)) for s in policy.catalog.sids])
        ids = torch.cat([torch.tensor(prompt).expand(len(sids), -1), sids], dim=1)  # (SIDs, T + depth)
        with torch.no_grad():
            log_probs = torch.log_softmax(policy.model(input_ids=ids).logits.float(), dim=-1)
        steps = log_probs[:, len(prompt) - 1 : len(prompt) - 1 + depth]  # (SIDs, depth, V)
        rows.append(steps.gather(2, sids[..., None]).squeeze(-1).sum(-1))
    return torch.stack(rows)


@pytest.mark.parametrize(
    ("codes", "items"),
    [((7,), 6), ((4, 3), 14), ((6, 5, 5), 120), ((3, 3, 2, 2), 50)],  # depths 1 to 4, SIDs shared by items
)
def test_every_depth_scores_and_ranks_as_brute_force(codes: tuple[int, ...], items: int) -> None:
    """Over left-padded prompts of different lengths: each SID returned scores as exhaustive scoring of that SID
    alone; the width searches exactly once it holds every prefix of each level; past the SIDs it pads."""
    from tests.conftest import make_catalog

    catalog = make_catalog(items, codes=codes, seed=len(codes))
    assert len(catalog.sids) < items  # some SIDs are several items'
    policy = Policy.from_preset("tiny", catalog, seed=1)
    policy.model.eval()
    trie, n = policy.trie, len(catalog.sids)
    hists = histories(policy, 4, len(codes))
    assert len({len(h) for h in hists}) > 1
    ids, mask = policy.encode_prompts(hists)
    want = brute_force(policy, hists)  # (B, SIDs)
    exact_from = max(trie.level_sizes[: trie.depth])  # every prefix of every level survives
    for k in sorted({1, 2, trie.codebook_size + 1, exact_from, n, n + 3}):
        got = beam_search(policy.model, trie, ids, mask, BeamSearchConfig(k))
        width = min(k, n)
        assert (got.sid_index[:, :width] >= 0).all() and (got.sid_index[:, width:] == -1).all()
        assert torch.isinf(got.scores[:, width:]).all()
        sid = got.sid_index[:, :width]
        torch.testing.assert_close(got.scores[:, :width], want.gather(1, sid), rtol=0, atol=1e-4)
        assert (got.scores[:, 1:width] <= got.scores[:, : width - 1]).all()
        if k >= exact_from:
            top = want.topk(width, dim=-1)
            torch.testing.assert_close(got.scores[:, :width], top.values, rtol=0, atol=1e-4)
            assert all(len(set(row)) == width for row in sid.tolist())


def test_exact_ties_still_give_k_distinct_valid_sids(tiny_catalog: SidCatalog) -> None:
    """Uniform logits tie every candidate of every level: which survive is topk's choice (not pinned), but
    each slot holds a distinct catalog SID at the one score they all share, and a rerun returns the same."""
    policy = Policy.from_preset("tiny", tiny_catalog, seed=0)
    policy.model.eval()
    with torch.no_grad():
        policy.model.get_output_embeddings().weight.zero_()
    ids, mask = policy.encode_prompts(histories(policy, 3, 4))
    uniform = -policy.trie.depth * torch.log(torch.tensor(float(len(policy.tokenizer))))
    for k in (3, 10, len(tiny_catalog.sids)):
        res = beam_search(policy.model, policy.trie, ids, mask, BeamSearchConfig(k))
        assert all(len(set(row)) == len(row) == k for row in res.ranked())
        torch.testing.assert_close(res.scores, uniform.expand(3, k))
        again = beam_search(policy.model, policy.trie, ids, mask, BeamSearchConfig(k))
        assert torch.equal(again.sid_index, res.sid_index)


def test_a_trie_of_the_offered_sids_searches_them_alone_as_the_reference_does(tiny_policy: Policy) -> None:
    """A service's items no longer offered (``SidTrie``'s keep): the search reaches only the SIDs kept, with the
    scores and order HF's constrained generate gives over the same trie, and the fusion's bonus skips the rest."""
    n = len(tiny_policy.catalog.sids)
    keep = [s for s in range(n) if s % 3]
    trie = SidTrie(tiny_policy.catalog, tiny_policy.token_id, keep)
    ids, mask = tiny_policy.encode_prompts(histories(tiny_policy, 5, 3))
    for k in (4, 12):
        ours = beam_search(tiny_policy.model, trie, ids, mask, BeamSearchConfig(k))
        ref = hf_beam_search(tiny_policy.model, trie, ids, mask, BeamSearchConfig(k))
        assert torch.equal(ours.sid_index, ref.sid_index) and set(ours.sid_index.flatten().tolist()) <= set(keep)
        torch.testing.assert_close(ours.scores, ref.scores, rtol=1e-5, atol=1e-5)
    wide = beam_search(tiny_policy.model, trie, ids, mask, BeamSearchConfig(n))  # every SID asked for: those kept
    assert (wide.sid_index >= 0).sum(-1).tolist() == [len(keep)] * 5
