"""Item-transition counts and shallow fusion: exact counts on hand-made rows, ties, the fused beam search."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from models.beam_search import BeamSearchConfig, beam_search
from models.node_bonus import NodeBonus
from models.policy import Policy
from models.sid_catalog import Item, SidCatalog, level_token
from models.sid_trie import SidTrie
from models.transition import ShallowFusion, TransitionCounts

# (history, target): 1 -> 2 twice, 1 -> 3 once, 2 -> 3 once, 3 -> 4 once; the empty history counts nothing
ROWS = [((1,), 2), ((5, 1), 2), ((1,), 3), ((1, 2), 3), ((2, 3), 4), ((), 9)]


def test_counts_each_last_item_transition() -> None:
    counts = TransitionCounts.fit(ROWS)
    assert counts.counts == {1: {2: 2, 3: 1}, 2: {3: 1}, 3: {4: 1}}
    assert counts.num_pairs == 4


def test_scores_weight_the_last_items_1_half_third() -> None:
    counts = TransitionCounts.fit(ROWS)
    # history (..., 1, 2, 3): 3 -> 4 at weight 1, 2 -> 3 at 1/2, 1 -> {2: 2, 3: 1} at 1/3
    assert counts.scores((7, 1, 2, 3)) == pytest.approx({4: 1.0, 3: 0.5 + 1 / 3, 2: 2 / 3})
    assert TransitionCounts(counts.counts, window=1).scores((1, 2, 3)) == {4: 1.0}
    assert counts.scores((8,)) == {}


def test_ties_go_to_the_more_popular_item_and_popularity_fills_the_list() -> None:
    counts = TransitionCounts.fit([((1,), 2), ((1,), 3)])  # 2 and 3 tie after item 1
    assert counts.rank_items((1,), popular=[3, 7, 2, 8], depth=4) == [3, 2, 7, 8]
    assert counts.rank_items((1,), popular=[2, 3], depth=1) == [2]
    assert counts.rank_items((99,), popular=[7, 8, 9], depth=2) == [7, 8]  # nothing followed 99: popularity


def test_scores_equal_as_fractions_tie_exactly() -> None:
    """1 + 2/3 and 5/3 are one score, though summed as floats they differ in the last bit: popularity breaks
    the tie, as for any other."""
    rows = [((1,), 10)] + [((3,), 10)] * 2 + [((3,), 11)] * 5  # after (3, 2, 1): 10 scores 1 + 2/3, 11 scores 5/3
    counts = TransitionCounts.fit(rows)
    scores = counts.scores((3, 2, 1))
    assert scores[10] != scores[11] and scores[10] == pytest.approx(scores[11])  # the float sums do differ
    assert counts.rank_items((3, 2, 1), popular=[10, 11], depth=2) == [10, 11]
    assert counts.rank_items((3, 2, 1), popular=[11, 10], depth=2) == [11, 10]


def test_an_item_named_twice_in_popular_is_ranked_once() -> None:
    counts = TransitionCounts.fit([((1,), 2)])  # it was appended at each of its places: [2, 7, 7, 8]
    assert counts.rank_items((1,), popular=[7, 7, 2, 8], depth=4) == [2, 7, 8]
    assert counts.rank_items((99,), popular=[7, 7, 8, 7, 9], depth=3) == [7, 8, 9]


def test_leave_out_takes_back_the_rows_own_transition_only() -> None:
    counts = TransitionCounts.fit(ROWS)
    # row ((5, 1), 2): 1 -> 2 was counted twice, once by this row; 5 -> anything never
    assert counts.scores((5, 1), leave_out=2) == pytest.approx({2: 1.0, 3: 1.0})
    # row ((1,), 3): 3's only count is its own, so it scores nothing
    assert counts.scores((1,), leave_out=3) == pytest.approx({2: 2.0})
    assert counts.scores((), leave_out=9) == {}  # an empty history was never counted
    with pytest.raises(ValueError, match="1 -> 4 was never counted"):
        counts.scores((1,), leave_out=4)


def test_leave_out_takes_back_the_whole_own_transition_when_the_last_item_repeats() -> None:
    # row ((1, 1), 2) is the only 1 -> 2: its one count scores 2 at 1 (last item) and 1/2 (the one before)
    counts = TransitionCounts.fit([((1, 1), 2), ((1,), 3)])
    assert counts.scores((1, 1)) == pytest.approx({2: 1.5, 3: 1.5})
    assert counts.scores((1, 1), leave_out=2) == pytest.approx({3: 1.5})  # as if counted without the row
    assert counts.scores((1, 4, 1), leave_out=2) == pytest.approx({3: 1 + 1 / 3})


def test_state_round_trip() -> None:
    counts = TransitionCounts.fit(ROWS, window=2)
    back = TransitionCounts.from_state(counts.to_state())
    assert back.counts == counts.counts and back.window == 2


def small_catalog() -> SidCatalog:
    sids = list(itertools.product(range(3), range(2), range(2)))[:10]
    items = {i: Item(i, "", tuple(level_token(lv, c) for lv, c in enumerate(sid))) for i, sid in enumerate(sids)}
    items[10] = Item(10, "", items[4].sid)  # two items share a SID: their scores add up
    return SidCatalog(items)


def test_node_bonus_is_the_max_below_each_node() -> None:
    catalog = small_catalog()
    tokens = sorted({t for s in catalog.sids for t in s})
    trie = SidTrie(catalog, {t: i for i, t in enumerate(tokens)}.get)
    counts = TransitionCounts.fit([((0,), 4), ((0,), 10), ((0,), 4), ((0,), 9)])
    bonus = counts.node_bonus([(0,), (5,)], catalog, trie, weight=2.0).dense()
    sid4 = catalog.sid_index[catalog.items[4].sid]
    sid9 = catalog.sid_index[catalog.items[9].sid]
    leaf = bonus[0, trie.sid_node]
    assert leaf[sid4] == pytest.approx(2.0 * torch.log1p(torch.tensor(3.0)))  # items 4 and 10: 2 + 1
    assert leaf[sid9] == pytest.approx(2.0 * torch.log1p(torch.tensor(1.0)))
    assert torch.count_nonzero(leaf) == 2 and torch.count_nonzero(bonus[1]) == 0
    assert bonus[0, 0] == pytest.approx(leaf[sid4])  # the root sees the best SID below it
    for node in range(1, trie.num_nodes):  # every node's bonus bounds its children's
        row = trie.child_nodes(torch.tensor(node))
        kids = row[row >= 0]
        if len(kids):
            assert bonus[0, node] == pytest.approx(bonus[0, kids].max())


def test_node_bonus_on_a_trie_of_some_sids_is_the_max_over_those_it_holds() -> None:
    """A SID the trie does not hold (``SidTrie``'s keep) carries no bonus up its path: its ancestors see the
    best SID below them that the trie holds, and nothing else breaks (its node is -1)."""
    catalog = small_catalog()
    tokens = sorted({t for s in catalog.sids for t in s})
    sid4, sid9 = (catalog.sid_index[catalog.items[i].sid] for i in (4, 9))
    trie = SidTrie(
        catalog, {t: i for i, t in enumerate(tokens)}.get, [s for s in range(len(catalog.sids)) if s != sid4]
    )
    counts = TransitionCounts.fit([((0,), 4), ((0,), 10), ((0,), 4), ((0,), 9)])
    bonus = counts.node_bonus([(0,)], catalog, trie, weight=2.0).dense()
    assert int(trie.sid_node[sid4]) == -1
    assert torch.count_nonzero(bonus[0, trie.level_nodes(trie.depth)]) == 1
    assert bonus[0, trie.sid_node[sid9]] == bonus[0, 0] == pytest.approx(2.0 * torch.log1p(torch.tensor(1.0)))


def test_node_bonus_leaves_out_each_rows_own_target() -> None:
    catalog = small_catalog()
    tokens = sorted({t for s in catalog.sids for t in s})
    trie = SidTrie(catalog, {t: i for i, t in enumerate(tokens)}.get)
    counts = TransitionCounts.fit([((0,), 4), ((0,), 9), ((0,), 9)])
    full = counts.node_bonus([(0,), (0,)], catalog, trie, weight=1.0).dense()
    left = counts.node_bonus([(0,), (0,)], catalog, trie, weight=1.0, leave_out=[4, 9]).dense()
    leaf = trie.sid_node[[catalog.sid_index[catalog.items[i].sid] for i in (4, 9)]]
    assert torch.allclose(full[:, leaf], torch.tensor([[math.log(2), math.log(3)]] * 2))
    assert torch.allclose(left[:, leaf], torch.tensor([[0.0, math.log(3)], [math.log(2), math.log(2)]]))
    with pytest.raises(ValueError, match="1 leave-out targets for 2 histories"):
        counts.node_bonus([(0,), (0,)], catalog, trie, weight=1.0, leave_out=[4])


def brute_force_fused(
    policy: Policy, ids: torch.Tensor, mask: torch.Tensor, bonus: NodeBonus
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every SID's log-prob plus its leaf's bonus: the ranking exhaustive search would return."""
    every = beam_search(policy.model, policy.trie, ids, mask, BeamSearchConfig(len(policy.catalog.sids)))
    fused = torch.full(every.scores.shape, float("-inf"))
    for b in range(ids.shape[0]):
        for j, s in enumerate(every.sid_index[b].tolist()):
            fused[b, j] = every.scores[b, j] + bonus.dense()[b, policy.trie.sid_node[s]]
    return fused, every.sid_index


def test_fused_beam_scores_are_log_prob_plus_leaf_bonus(tiny_policy: Policy) -> None:
    catalog = tiny_policy.catalog
    hists = [(0, 1), (2,), (5, 3)]
    counts = TransitionCounts.fit([((1,), 7), ((1,), 8), ((1,), 7), ((2,), 9), ((3,), 11)])
    fusion = ShallowFusion(counts, 1.5)
    bonus = fusion.node_bonus(hists, catalog, tiny_policy.trie)
    ids, mask = tiny_policy.encode_prompts([[catalog.sid_of(i) for i in h] for h in hists])
    k = len(catalog.sids)  # exhaustive: the fused ranking must equal brute force exactly
    fused = beam_search(tiny_policy.model, tiny_policy.trie, ids, mask, BeamSearchConfig(k), bonus)
    want, sids = brute_force_fused(tiny_policy, ids, mask, bonus)
    for b in range(len(hists)):
        by_sid = dict(zip(sids[b].tolist(), want[b].tolist(), strict=True))
        got = dict(zip(fused.sid_index[b].tolist(), fused.scores[b].tolist(), strict=True))
        assert got == pytest.approx(by_sid, abs=1e-4)
        assert torch.all(fused.scores[b, :-1] >= fused.scores[b, 1:])


def test_a_large_weight_puts_the_observed_transitions_first(tiny_policy: Policy) -> None:
    catalog = tiny_policy.catalog
    counts = TransitionCounts.fit([((1,), 7), ((1,), 7), ((1,), 30)])
    ids, mask = tiny_policy.encode_prompts([[catalog.sid_of(1)]])
    bonus = ShallowFusion(counts, 50.0).node_bonus([(1,)], catalog, tiny_policy.trie)
    top = beam_search(tiny_policy.model, tiny_policy.trie, ids, mask, BeamSearchConfig(5), bonus).ranked()[0]
    assert top[:2] == [catalog.sid_index[catalog.items[7].sid], catalog.sid_index[catalog.items[30].sid]]
    plain = beam_search(tiny_policy.model, tiny_policy.trie, ids, mask, BeamSearchConfig(5))
    nothing = NodeBonus.from_dense(torch.zeros_like(bonus.dense()))  # no entry held: every lookup reads 0
    zero = beam_search(tiny_policy.model, tiny_policy.trie, ids, mask, BeamSearchConfig(5), nothing)
    assert torch.equal(plain.sid_index, zero.sid_index)  # no transitions: the policy's own ranking


def test_rejects_negative_weight_and_window() -> None:
    with pytest.raises(ValueError, match="fusion weight"):
        ShallowFusion(TransitionCounts({}), -1.0)
    with pytest.raises(ValueError, match="window"):
        TransitionCounts({}, window=0)
