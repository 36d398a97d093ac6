"""VED's contracts as properties over tiny random catalogs, policies and settings (hypothesis).

Each example builds a catalog (SIDs of 2-4 tokens, 1-6 codes a level, as few as one SID), a
tiny random policy over it and a value head whose values spread well beyond float noise, then
checks what ``models.ved`` promises of the anytime fallback: a deadline passed returns beam
search's answer, and the fallback's stats are what that initial tree spent; a tree holds no
more slots than the catalog has prefixes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.beam_search import BeamSearchConfig, beam_search
from models.node_bonus import NodeBonus
from models.policy import Policy, pad_left
from models.value_head import ValueHead, value_head_for
from models.ved import VEDResult, ved_search
from models.ved_config import VEDConfig, initial_beam_stats
from tests.conftest import make_catalog


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Case:
    policy: Policy
    head: ValueHead
    ids: torch.Tensor  # (B, T) left-padded prompts
    mask: torch.Tensor  # (B, T)
    rng: random.Random
    label: str  # what a failing example shows: the seed it was built from and the catalog's shape

    def __repr__(self) -> str:
        return self.label

    def search(self, config: VEDConfig, bonus: NodeBonus | None = None) -> VEDResult:
        return ved_search(self.policy.model, self.head, self.policy.trie, self.ids, self.mask, config, bonus)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """A random catalog, a tiny policy and value head over it, and 1-3 prompts of its SIDs."""
    seed = draw(st.integers(0, 2**16))
    rng = random.Random(seed)  # the shapes are drawn from it: hypothesis's own draws favour the smallest
    codes = tuple(rng.randint(1, 6) for _ in range(rng.randint(2, 4)))
    catalog = make_catalog(rng.randint(1, 120), codes, seed=seed)
    policy = Policy.from_preset("tiny", catalog, seed=seed % 5)
    policy.model.eval()
    torch.manual_seed(seed)
    head = value_head_for(policy).eval()
    with torch.no_grad():
        head.mlp[-1].weight.mul_(100.0)
    tok = policy.tokenizer
    rows = []
    for n in [rng.randint(1, 5) for _ in range(rng.randint(1, 3))]:
        items = [tok.convert_tokens_to_ids(list(rng.choice(catalog.sids))) for _ in range(n)]
        rows.append([t for sid in items for t in sid] + [tok.convert_tokens_to_ids("<sep>")])
    ids, mask = pad_left(rows, int(tok.pad_token_id))
    label = f"seed {seed}: codes {codes}, {len(catalog.sids)} SIDs, prompts {ids.tolist()}"
    return Case(policy, head, ids, mask, rng, label)


@settings(max_examples=25, deadline=None)
@given(cases(), st.booleans())
def test_a_deadline_passed_returns_beam_searchs_answer_and_the_fallbacks_stats(case: Case, fused: bool) -> None:
    """With init_beams >= G the initial tree is beam search of width init_beams (fused when there is a bonus):
    its top G, scores included. What it spent is what ``initial_beam_stats`` reports for the fallback that runs
    that beam search instead: the prefixes fed, and the nodes they make (a complete SID is never a node)."""
    trie = case.policy.trie
    k = case.rng.randint(1, 8)
    config = VEDConfig(case.rng.randint(1, k), init_beams=k, deadline=0.0, seed=case.rng.randrange(100))
    bonus = None
    if fused:
        g = torch.Generator().manual_seed(case.rng.randrange(1000))
        shape = (case.ids.shape[0], trie.num_nodes)
        bonus = NodeBonus.from_dense((torch.rand(shape, generator=g) < 0.3) * torch.rand(shape, generator=g) * 3)
    res = case.search(config, bonus)
    beam = beam_search(case.policy.model, trie, case.ids, case.mask, BeamSearchConfig(k), bonus)
    g = config.num_candidates
    assert torch.equal(res.decode.sid_index, beam.sid_index[:, :g])
    torch.testing.assert_close(res.decode.scores, beam.scores[:, :g], rtol=1e-5, atol=1e-5)
    fallback = initial_beam_stats(config, trie)
    for s in res.stats:
        assert s.iterations == 0 and s.tokens_spent == s.init_tokens and s.cap_hit == (s.stop_reason == "deadline")
        if s.cap_hit:  # else the initial tree held every prefix: nothing was left to stop
            assert replace(s, leaves=fallback.leaves) == fallback


def test_a_budget_past_the_catalog_holds_a_slot_per_prefix_not_per_token(tiny_policy: Policy) -> None:
    """A tree never holds more prefixes than the catalog has: its node and cache buffers were sized by the
    budget, so a budget of 4,096 (a request may ask for it) on this 36-prefix catalog made 114 times the slots
    a tree can fill (32 prompts: 0.21 s a search; sized by the catalog, 0.022 s). The answer is the same."""
    torch.manual_seed(0)
    head = value_head_for(tiny_policy).eval()
    trie = tiny_policy.trie
    ids, mask = tiny_policy.encode_prompts([list(tiny_policy.catalog.sids[:3]), list(tiny_policy.catalog.sids[5:6])])
    big = ved_search(tiny_policy.model, head, trie, ids, mask, VEDConfig(6, budget=4096))
    assert big.tree.parent.shape[1] == trie.num_prefixes + 1
    exact = ved_search(tiny_policy.model, head, trie, ids, mask, VEDConfig(6, budget=trie.num_prefixes))
    assert torch.equal(big.decode.sid_index, exact.decode.sid_index)
    assert torch.equal(big.decode.scores, exact.decode.scores)
    assert [replace(s, budget=0) for s in big.stats] == [replace(s, budget=0) for s in exact.stats]
