"""VED: the tree formulas on a hand-built tree, then contracts of the search on the tiny policy.

Hand cases pin the standardised G, U and the "expand me" arm (root widening),
the gate, the descent, backup and the entropy over valid children; the search
is checked for beam search's budget accounting (complete SIDs are free), root
widening, the exhaustive-budget optimum (brute force over every catalog SID:
path log-prob plus the value term, V of the parent prefix from a full
forward), the exploratory slots, beta's scale, the anytime fallback (the
initial beam), validity, determinism and batched == one-by-one.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import replace

import pytest
import torch

from models.backbone import prompt_position_ids
from models.beam_search import BeamSearchConfig, beam_search
from models.policy import Policy, pad_left
from models.search_noise import gumbel_noise
from models.search_tree import SearchTree, standardise_by_depth, sum_by_depth, valid_entropy
from models.sid_trie import SidTrie
from models.transition import TransitionCounts
from models.value_head import ValueHead, value_head_for
from models.ved import ved_search
from models.ved_config import VEDConfig, resolve_budget

NEG = float("-inf")


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the tree formulas, by hand -------------------------------------------------------------


def lp(*probs: float) -> list[float]:
    return [math.log(p) if p > 0 else NEG for p in probs]


def entropy(*probs: float) -> float:
    return -sum(p * math.log(p) for p in probs if p > 0)


def hand_tree(root_value: float = 0.0) -> SearchTree:
    """Prefixes of depth-3 SIDs (nodes down to depth 2): root -> a (code 0), b (code 1), code 2 unexpanded;
    a -> a0 (code 0, the deepest prefix level: its children are complete SIDs), code 1 unexpanded.

    lam = 0.5. G(root) = root_value + 0.5 H(.5, .3, .2); G(a) = 1 + 0.5 H(.6, .4);
    G(b) = 0.2 (one valid child: H = 0); G(a0) = 0.7 + 0.5 H(.5, .5). Visits: root 3, a 2, b 1, a0 1;
    own arms E: root 2 (a, b), a 1 (a0), b 0, a0 0.
    """
    tree = SearchTree.empty(1, 8, 3, 2, lam=0.5, device=torch.device("cpu"))
    zero = torch.zeros(1, dtype=torch.long)

    def add(parent: int, code: int, value: float, child_lp: list[float]) -> None:
        node = tree.allocate(zero, torch.tensor([parent]), torch.tensor([code]), torch.tensor([0]), torch.tensor([7]))
        tree.backup(zero, node)
        tree.evaluate(zero, node, torch.tensor([value]), torch.tensor([child_lp]))

    tree.evaluate(zero, zero, torch.tensor([root_value]), torch.tensor([lp(0.5, 0.3, 0.2)]))
    add(0, 0, 1.0, lp(0.3, 0.2, 0))  # a = 1; valid probs renormalise to (.6, .4)
    add(0, 1, 0.2, lp(0.9, 0, 0))  # b = 2
    add(1, 0, 0.7, lp(0.1, 0, 0.1))  # a0 = 3, its two complete SIDs: codes 0 and 2
    return tree


def g_values(root_value: float = 0.0) -> list[float]:
    return [
        root_value + 0.5 * entropy(0.5, 0.3, 0.2),
        1.0 + 0.5 * entropy(0.6, 0.4),
        0.2,
        0.7 + 0.5 * entropy(0.5, 0.5),
    ]


def test_entropy_is_over_valid_children_renormalised() -> None:
    out = valid_entropy(torch.tensor([lp(0.2, 0.1, 0.1, 0), [NEG] * 4]))
    torch.testing.assert_close(out, torch.tensor([1.5 * math.log(2), 0.0]))


def test_hand_tree_bookkeeping() -> None:
    tree = hand_tree()
    torch.testing.assert_close(tree.score[0, :4], torch.tensor(g_values()))
    assert tree.visits[0, :4].tolist() == [3, 2, 1, 1]
    assert tree.self_visits[0, :4].tolist() == [2, 1, 0, 0]
    # a0 has valid children, but they are complete SIDs: never nodes, so a0 is not expandable
    assert tree.expandable()[0, :4].tolist() == [True, True, True, False]
    assert tree.open_nodes()[0, :4].tolist() == [True, True, True, False]
    assert tree.path[0, 3].tolist() == [1, 3] and tree.depth[0, :4].tolist() == [0, 1, 1, 2]
    # path log-prob: the policy's (unrenormalised) log-probs along root -> a -> a0
    assert math.isclose(float(tree.log_prob[0, 3]), math.log(0.5 * 0.3), rel_tol=1e-6)
    with pytest.raises(AssertionError, match="never a node"):
        tree.allocate(*(torch.tensor([x]) for x in (0, 3, 0, 0, 7)))


def test_candidates_are_the_children_of_the_deepest_prefixes() -> None:
    cand = hand_tree().candidate_log_probs()[0]  # (M, C)
    want = torch.full_like(cand, NEG)
    want[3, 0] = want[3, 2] = math.log(0.5 * 0.3 * 0.1)
    torch.testing.assert_close(cand, want)


def test_g_is_standardised_within_each_depth() -> None:
    tree = hand_tree()
    # depth 1 holds a and b: +-1 (population std); the root and a0 are alone at their depths: 0; free slots: 0
    torch.testing.assert_close(tree.normalised_score()[0], torch.tensor([0.0, 1.0, -1.0, 0.0, 0, 0, 0, 0]))
    # so U does not change when V and lam scale together: beta is in units of G's spread
    scaled = hand_tree()
    scaled.score *= 25.0
    torch.testing.assert_close(scaled.u_score(1.0), tree.u_score(1.0))
    torch.testing.assert_close(scaled.self_u_score(1.0), tree.self_u_score(1.0))


def test_standardising_keeps_the_spread_of_values_far_from_zero() -> None:
    """Values of 1000 +- 0.05 are +-1 once standardised: E[x^2] - mean^2 in float32 lost their spread (x^2 near
    1e6 is held to about 0.06)."""
    x = torch.tensor([[1000.0, 1000.1, 999.9, 1000.0, 5.0]])  # depth 1: the first two, depth 2: the next two
    depth, live = torch.tensor([[1, 1, 2, 2, 0]]), torch.tensor([[True, True, True, True, False]])
    z = standardise_by_depth(x, depth, live, 3)
    torch.testing.assert_close(z, torch.tensor([[-1.0, 1.0, -1.0, 1.0, 0.0]]), atol=1e-3, rtol=0)


def test_sums_by_depth_agree_by_scatter_and_by_reduction() -> None:
    """CUDA sums each depth by a reduction (a fixed order; a scatter-add's atomic adds vary from run to run),
    the CPU by the scatter-add its figures were measured with: the same sums either way."""
    g = torch.Generator().manual_seed(0)
    x, depth = torch.randn(5, 40, generator=g), torch.randint(0, 4, (5, 40), generator=g)
    scatter = sum_by_depth(x, depth, 4, by_reduction=False)
    torch.testing.assert_close(sum_by_depth(x, depth, 4, by_reduction=True), scatter)
    assert torch.equal(sum_by_depth(x, depth, 4), scatter)  # on the CPU: the scatter-add itself
    expected = torch.tensor([[float(x[b][depth[b] == d].sum()) for d in range(4)] for b in range(5)])
    torch.testing.assert_close(scatter, expected)


@pytest.mark.parametrize("beta", [0.0, 1.0, 10.0])
def test_u_formulas(beta: float) -> None:
    tree = hand_tree()
    g_hat, n, own = [0.0, 1.0, -1.0, 0.0], [3, 2, 1, 1], [2, 1, 0, 0]
    want = [g_hat[i] + beta * math.sqrt(math.log(3 + 1) / (n[i] + 1)) for i in range(4)]
    torch.testing.assert_close(tree.u_score(beta)[0, :4], torch.tensor(want))
    want_own = [g_hat[i] + beta * math.sqrt(math.log(3 + 1) / (own[i] + 1)) for i in range(4)]
    torch.testing.assert_close(tree.self_u_score(beta)[0, :4], torch.tensor(want_own))


@pytest.mark.parametrize(
    ("beta", "selected"),
    [
        (0.0, 1),  # pure Ĝ: a (+1) beats the root's own arm (0) and b (-1); at a, a0 is closed -> a widens
        (1.0, 1),  # a 1.68 > root 0.68 > b -0.17; at a: a's own arm is its only one
        (100.0, 2),  # exploration dominates: b (N = 1) 82.2 > a (N = 2) 69.0 > root (E = 2) 68.0
    ],
)
def test_descent_by_u(beta: float, selected: int) -> None:
    tree = hand_tree()
    assert tree.select(torch.tensor([True]), beta).tolist() == [selected]
    assert tree.select(torch.tensor([False]), beta).tolist() == [-1]


def test_a_tie_between_a_nodes_own_arm_and_its_best_child_goes_to_the_node() -> None:
    tree = hand_tree()
    tree.score[0, 2] = tree.score[0, 1]  # a and b tie: no spread at depth 1, so both have Ĝ 0, as the root has
    assert tree.normalised_score()[0, :3].tolist() == [0.0, 0.0, 0.0]
    assert tree.select(torch.tensor([True]), 0.0).tolist() == [0]  # the root's own arm (0) against a's (0)


def test_the_root_widens_once_its_children_are_visited_more_than_its_own_arm() -> None:
    """The root's own arm counts its own expansions (E = 2), not its subtree: once a and b have been
    visited enough, it wins (here a: 1 + sqrt(ln 164 / 83) = 1.25 < root: sqrt(ln 164 / 3) = 1.30).
    Scored by N(root) instead, as before, it could never beat a child."""
    tree = hand_tree()
    for node in (1, 2) * 80:
        tree.backup(torch.tensor([0]), torch.tensor([node]))
    assert tree.select(torch.tensor([True]), 1.0).tolist() == [0]
    old_rule = tree.normalised_score()[0, 0] + math.sqrt(math.log(tree.visits[0, 0] + 1) / (tree.visits[0, 0] + 1))
    assert float(old_rule) < float(tree.u_score(1.0)[0, 1:3].max())


def test_gate_against_depth_mean() -> None:
    tree = hand_tree()
    g = g_values()
    torch.testing.assert_close(tree.depth_mean()[0], torch.tensor([g[0], (g[1] + g[2]) / 2, g[3]]))
    # root: its own mean; a: above the depth-1 mean; b: below; a0: alone at its depth
    assert [bool(tree.passes_gate(torch.tensor([i]))) for i in range(4)] == [True, True, False, True]
    assert not bool(tree.passes_gate(torch.tensor([-1])))


def test_g_hat_and_the_depth_means_are_kept_until_a_node_is_evaluated() -> None:
    """Both are read at every selection but change only when a node goes live: kept between evaluations,
    never stale after one (a pending node, visits and gate failures leave them as they are)."""
    tree = hand_tree()

    def fresh() -> tuple[torch.Tensor, torch.Tensor]:
        live = tree.live.float()
        mean = sum_by_depth(tree.score * live, tree.depth, 3) / sum_by_depth(live, tree.depth, 3)
        return standardise_by_depth(tree.score, tree.depth, tree.live, 3), mean

    def check() -> None:
        want_g_hat, want_mean = fresh()
        assert torch.equal(tree.normalised_score(), want_g_hat)
        torch.testing.assert_close(tree.depth_mean(), want_mean, equal_nan=True)

    check()
    before = tree.normalised_score().clone()
    zero = torch.zeros(1, dtype=torch.long)
    node = tree.allocate(zero, zero, torch.tensor([2]), zero, torch.tensor([7]))  # c: pending
    tree.backup(zero, node)
    tree.fail(zero, torch.tensor([2]))
    check()
    assert torch.equal(tree.normalised_score(), before)
    tree.evaluate(zero, node, torch.tensor([5.0]), torch.tensor([lp(0.5, 0.5, 0)]))  # depth 1: a, b and c
    check()
    assert not torch.equal(tree.normalised_score(), before)


def test_backup_fail_and_sampling_from_unexpanded_codes() -> None:
    tree = hand_tree()
    tree.backup(torch.tensor([0]), torch.tensor([3]))
    assert tree.visits[0, :4].tolist() == [4, 3, 1, 2]
    tree.fail(torch.tensor([0]), torch.tensor([2]))  # a gate failure at b: a visit up its path and of its own arm
    assert tree.visits[0, :4].tolist() == [5, 3, 2, 2] and tree.self_visits[0, :4].tolist() == [2, 1, 1, 0]
    noise = torch.randn(64, 3) * 10
    rows = torch.zeros(64, dtype=torch.long)
    assert set(tree.sample_child(rows, torch.zeros(64, dtype=torch.long), noise).tolist()) == {2}
    assert set(tree.sample_child(rows, torch.ones(64, dtype=torch.long), noise).tolist()) == {1}
    # temperature 0: the most likely unexpanded code whatever the noise
    tree.child_log_prob[0, 0] = torch.tensor(lp(0.2, 0.3, 0.5))
    tree.child[0, 0, 2] = -1
    tree.child[0, 0, 1] = -1
    zeros = torch.zeros(64, dtype=torch.long)
    assert set(tree.sample_child(rows, zeros, noise, temperature=0.0).tolist()) == {2}


def test_hashed_gumbel_draws_follow_the_renormalised_policy() -> None:
    n = 20000
    noise = gumbel_noise(torch.full((n,), 12345), torch.arange(n), 3)  # (n, 3)
    tree = SearchTree.empty(1, 4, 3, 1, lam=0.0, device=torch.device("cpu"))
    zero = torch.zeros(1, dtype=torch.long)
    tree.evaluate(zero, zero, torch.tensor([0.0]), torch.tensor([lp(0.5, 0.3, 0.2)]))
    tree.allocate(zero, zero, zero, zero, zero)  # code 0 taken: draws are over {1: .6, 2: .4}
    codes = tree.sample_child(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), noise)
    assert set(codes.tolist()) == {1, 2}
    assert abs(float((codes == 1).float().mean()) - 0.6) < 0.02


# ---- the search on the tiny policy ----------------------------------------------------------


def prompts(policy: Policy, lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Histories of catalog SIDs + <sep>, as token ids (the tokenizer maps single tokens exactly)."""
    rng = random.Random(seed)
    tok = policy.tokenizer
    rows = []
    for n in lengths:
        items = [tok.convert_tokens_to_ids(list(rng.choice(policy.catalog.sids))) for _ in range(n)]
        rows.append([t for sid in items for t in sid] + [tok.convert_tokens_to_ids("<sep>")])
    return pad_left(rows, int(tok.pad_token_id))


@pytest.fixture(scope="module")
def head(tiny_policy: Policy) -> ValueHead:
    torch.manual_seed(0)
    net = value_head_for(tiny_policy).eval()
    with torch.no_grad():  # spread the values well beyond float noise
        net.mlp[-1].weight.mul_(100.0)
    return net


def brute_force(policy: Policy, head: ValueHead, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per prompt and catalog SID, by one full forward per prompt: the path log-prob (B, S) and V at the
    SID's parent prefix s_{D-1} (B, S); and each SID's parent trie node (S,)."""
    trie, tok = policy.trie, policy.tokenizer
    sids = torch.tensor([tok.convert_tokens_to_ids(list(s)) for s in policy.catalog.sids])  # (S, D)
    d = trie.depth
    lps, values = [], []
    for b in range(ids.shape[0]):
        seq = torch.cat([ids[b].expand(len(sids), -1), sids], dim=1)  # (S, T+D)
        m = torch.cat([mask[b].expand(len(sids), -1), torch.ones_like(sids)], dim=1)
        with torch.no_grad():
            pos = prompt_position_ids(m)
            run = policy.model(input_ids=seq, attention_mask=m, position_ids=pos, output_hidden_states=True)
            logp = run.logits[:, -d - 1 : -1].float().log_softmax(-1).gather(-1, sids[..., None])[..., 0]
            lps.append(logp.sum(-1))
            values.append(head(run.hidden_states[-1], m)[:, -2])
    return torch.stack(lps), torch.stack(values), trie.parent[trie.sid_node]


def prefix_count(policy: Policy) -> int:
    """Trie nodes at depths 1 .. D-1: every prefix VED can feed the backbone."""
    depth = policy.trie.node_depth
    return int(((depth >= 1) & (depth < policy.trie.depth)).sum())


def test_resolve_budget() -> None:
    assert resolve_budget(VEDConfig(), 3) == 64  # 2 x beam search of width 16: 2 x 16 x 2
    assert resolve_budget(VEDConfig(num_candidates=2), 3) == 32  # raised to (3 - 1) x max(16, 2)
    assert resolve_budget(VEDConfig(num_candidates=2, init_beams=4), 3) == 8
    assert resolve_budget(VEDConfig(budget=50), 3) == 50
    with pytest.raises(ValueError, match="budget 30"):
        resolve_budget(VEDConfig(num_candidates=16, budget=30), 3)
    with pytest.raises(ValueError, match="init_beams"):
        VEDConfig(init_beams=0)
    with pytest.raises(ValueError, match="explore_slots"):
        VEDConfig(num_candidates=4, explore_slots=5)
    # SIDs of one token have no prefixes: the RL run checks the budget before it writes anything, so this
    # stops it there (it used to stop at VED's first search, <out>.resume written)
    with pytest.raises(ValueError, match="SIDs of depth 1 have none"):
        resolve_budget(VEDConfig(), 1)


def test_complete_sids_cost_nothing(tiny_policy: Policy, head: ValueHead) -> None:
    """Beam search's accounting: every prefix fed costs one token, a complete SID none (it is never fed);
    the initial tree is what beam search of width init_beams feeds (6 level-1 codes exist, then 8 prefixes)."""
    trie = tiny_policy.trie
    ids, mask = prompts(tiny_policy, [2, 5, 3], 0)
    config = VEDConfig(num_candidates=8, init_beams=8, budget=30)
    res = ved_search(tiny_policy.model, head, trie, ids, mask, config)
    leaf_counts = trie.leaf_counts()
    for b, s in enumerate(res.stats):
        assert s.init_tokens == 6 + 8
        assert s.tokens_spent == s.budget == 30 and s.stop_reason == "budget" and not s.cap_hit
        assert s.nodes == s.tokens_spent + 1 and s.max_depth == 3
        live = res.tree.live[b]
        assert int(res.tree.depth[b][live].max()) == 2  # no node is a complete SID
        deepest = res.tree.trie_node[b][live & (res.tree.depth[b] == 2)]
        assert s.leaves == int(leaf_counts[deepest].sum())  # every SID under a fed prefix is a candidate
        assert s.iterations >= s.tokens_spent - s.init_tokens + s.gate_failures


def test_the_initial_tree_widens_a_level_only_as_far_as_it_must(tiny_policy: Policy, head: ValueHead) -> None:
    """A level keeps init_beams prefixes, and more only while those kept cannot hold G complete SIDs: the
    kept prefixes hold G (or every SID), and without the worst of them (by path log-prob) they would not."""
    trie = tiny_policy.trie
    leaf_counts = trie.leaf_counts()
    ids, mask = prompts(tiny_policy, [2, 4, 3], 10)
    widened = 0
    for g in range(1, 25):
        target = min(g, len(tiny_policy.catalog.sids))
        res = ved_search(tiny_policy.model, head, trie, ids, mask, VEDConfig(g, init_beams=1, deadline=0.0))
        tree = res.tree
        for b in range(ids.shape[0]):
            for level in (1, 2):
                kept = tree.live[b] & (tree.depth[b] == level)
                order = tree.log_prob[b][kept].argsort(descending=True)
                held = leaf_counts[tree.trie_node[b][kept]][order]
                assert int(held.sum()) >= target
                if len(held) > 1:
                    assert int(held[:-1].sum()) < target, (g, b, level, held.tolist())
                    widened += 1
    assert widened > 0  # the widening was exercised


def test_the_search_widens_the_root(tiny_policy: Policy, head: ValueHead) -> None:
    ids, mask = prompts(tiny_policy, [2, 5, 3], 7)
    config = VEDConfig(num_candidates=2, init_beams=1, budget=24)
    res = ved_search(tiny_policy.model, head, tiny_policy.trie, ids, mask, config)
    beam = ved_search(tiny_policy.model, head, tiny_policy.trie, ids, mask, replace(config, deadline=0.0))
    assert beam.tree.n_children[:, 0].tolist() == [1, 1, 1]  # the initial tree: one level-1 prefix
    assert all(n > 1 for n in res.tree.n_children[:, 0].tolist())


@pytest.mark.parametrize(
    ("by", "per_step", "value_weight"),  # the completion feeds a level at a time: expansions_per_step is unread
    [("search", 1, 0.0), ("search", 8, 0.0), ("search", 4, 0.5), ("completion", 1, 0.0), ("completion", 1, 0.5)],
)
def test_exhaustive_budget_returns_the_true_top_by_score(
    tiny_policy: Policy, head: ValueHead, per_step: int, value_weight: float, by: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every prefix fed, the pool is the catalog and the returned set is its top G by path log-prob
    plus value_weight x the parent prefix's V standardised over all prefixes of that depth (brute force);
    whether the search gets there or, as a budget that covers the catalog does, the completion."""
    if by == "search":
        monkeypatch.setattr("models.ved.covers_the_catalog", lambda trie, budget: False)
    trie = tiny_policy.trie
    ids, mask = prompts(tiny_policy, [3, 1], 1)
    g, n = 10, prefix_count(tiny_policy)
    config = VEDConfig(num_candidates=g, budget=n, expansions_per_step=per_step, value_weight=value_weight)
    res = ved_search(tiny_policy.model, head, trie, ids, mask, config)
    lp_all, v_parent, parent = brute_force(tiny_policy, head, ids, mask)
    for b, s in enumerate(res.stats):
        assert s.stop_reason == "exhausted" and s.tokens_spent == n and s.leaves == len(tiny_policy.catalog.sids)
        v = torch.zeros(trie.num_nodes).index_put_((parent,), v_parent[b])  # V of each deepest prefix
        prefixes = parent.unique()
        z = (v_parent[b] - v[prefixes].mean()) / v[prefixes].std(unbiased=False)
        score = lp_all[b] + value_weight * z
        want = score.argsort(descending=True)[:g]
        assert res.decode.sid_index[b].tolist() == want.tolist()
        torch.testing.assert_close(res.decode.scores[b], score[want], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(res.log_probs[b], lp_all[b, want], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(res.path_values[b, :, -1], v_parent[b, want], rtol=1e-4, atol=1e-4)


def test_a_budget_that_covers_the_catalog_completes_the_tree_without_searching(
    tiny_policy: Policy, head: ValueHead
) -> None:
    """The search would exhaust the tree (its budget cannot run out first), after selections that mostly fail
    the gate near the end: every prefix is added a level at a time instead. One token less searches."""
    ids, mask = prompts(tiny_policy, [3, 1, 4], 2)
    n = prefix_count(tiny_policy)
    done = ved_search(tiny_policy.model, head, tiny_policy.trie, ids, mask, VEDConfig(num_candidates=6, budget=n))
    assert [(s.iterations, s.gate_failures, s.tokens_spent, s.stop_reason) for s in done.stats] == [
        (0, 0, n, "exhausted")
    ] * 3
    fewer = ved_search(tiny_policy.model, head, tiny_policy.trie, ids, mask, VEDConfig(num_candidates=6, budget=n - 1))
    assert all(s.iterations > 0 and s.stop_reason == "budget" for s in fewer.stats)
    # forwards no wider than the initial tree's (3 prompts x 2 nodes here): many of them, the same nodes and SIDs
    narrow = VEDConfig(num_candidates=2, init_beams=2, budget=n)
    chunked = ved_search(tiny_policy.model, head, tiny_policy.trie, ids, mask, narrow)
    assert [s.tokens_spent for s in chunked.stats] == [n] * 3
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("models.ved.covers_the_catalog", lambda trie, budget: False)
        searched = ved_search(tiny_policy.model, head, tiny_policy.trie, ids, mask, narrow)
    assert torch.equal(chunked.decode.sid_index, searched.decode.sid_index)
    late = VEDConfig(num_candidates=6, budget=4 * n, deadline=0.0)  # a deadline passed: the initial tree
    assert all(
        s.cap_hit and s.tokens_spent < n
        for s in ved_search(tiny_policy.model, head, tiny_policy.trie, ids, mask, late).stats
    )


def test_explore_slots_take_first_level_codes_the_head_missed(tiny_policy: Policy, head: ValueHead) -> None:
    ids, mask = prompts(tiny_policy, [4, 2, 6], 8)
    g, k = 8, 3
    res = ved_search(tiny_policy.model, head, tiny_policy.trie, ids, mask, VEDConfig(g, explore_slots=k))
    plain = ved_search(tiny_policy.model, head, tiny_policy.trie, ids, mask, VEDConfig(g))
    assert torch.equal(res.tree.token, plain.tree.token)  # the same search; only the returned set differs
    first = res.decode.token_ids[..., 0]  # (B, G)
    for b in range(ids.shape[0]):
        assert res.decode.sid_index[b, : g - k].tolist() == plain.decode.sid_index[b, : g - k].tolist()
        pool_codes = set(res.tree.code[b][res.tree.live[b] & (res.tree.depth[b] == 1)].tolist())
        head_codes = set(first[b, : g - k].tolist())
        fresh = first[b, g - k :].tolist()
        assert len(pool_codes) - len(head_codes) >= k  # the pool has codes to explore
        assert len(set(fresh)) == k and not set(fresh) & head_codes


def test_beta_is_in_units_of_the_spread_of_g(tiny_policy: Policy, head: ValueHead) -> None:
    """V and lam scaled together by 8 scale every G by 8: the standardised G, hence the search, stay the same."""
    ids, mask = prompts(tiny_policy, [3, 5], 9)
    scaled = copy.deepcopy(head)
    with torch.no_grad():
        scaled.mlp[-1].weight.mul_(8.0)
        scaled.mlp[-1].bias.mul_(8.0)
    config = VEDConfig(num_candidates=8, init_beams=8, budget=30, lam=0.25, seed=4)  # 36 prefixes: a search
    res = ved_search(tiny_policy.model, head, tiny_policy.trie, ids, mask, config)
    big = ved_search(tiny_policy.model, scaled, tiny_policy.trie, ids, mask, replace(config, lam=2.0))
    torch.testing.assert_close(big.tree.score, res.tree.score * 8, rtol=1e-4, atol=1e-4)
    assert torch.equal(big.tree.token, res.tree.token)
    lam_only = ved_search(tiny_policy.model, head, tiny_policy.trie, ids, mask, replace(config, lam=2.0))
    assert not torch.equal(lam_only.tree.token, res.tree.token)  # G steers this search: the test is not vacuous


def test_work_between_steps_on_the_same_model_changes_nothing(tiny_policy: Policy, head: ValueHead) -> None:
    """The server decodes waiting beam requests between a search's steps, on the same model: the search's
    SIDs, scores, tree and stats are those of a search alone. The callback runs before each forward after the
    prefill: the initial tree's levels, then each step (a search) or each forward that completes a level (a
    budget that covers the catalog)."""
    ids, mask = prompts(tiny_policy, [3, 5, 2], 6)
    others, other_mask = prompts(tiny_policy, [6, 1], 11)
    calls: list[int] = []

    def beams() -> None:
        calls.append(1)
        beam_search(tiny_policy.model, tiny_policy.trie, others, other_mask, BeamSearchConfig(5))

    n = prefix_count(tiny_policy)
    for config in (VEDConfig(num_candidates=8, init_beams=4, budget=30, seed=3), VEDConfig(6, budget=n)):
        alone = ved_search(tiny_policy.model, head, tiny_policy.trie, ids, mask, config)
        calls.clear()
        shared = ved_search(tiny_policy.model, head, tiny_policy.trie, ids, mask, config, between_steps=beams)
        assert torch.equal(shared.decode.sid_index, alone.decode.sid_index)
        assert torch.equal(shared.decode.scores, alone.decode.scores)
        assert torch.equal(shared.tree.token, alone.tree.token) and shared.stats == alone.stats
        steps = max(s.iterations for s in alone.stats) > 0  # a search: one call per step at least
        assert len(calls) >= tiny_policy.trie.depth - 1 + 1 + steps, (config, len(calls))


def test_the_deadline_is_read_after_the_work_between_steps(tiny_policy: Policy, head: ValueHead) -> None:
    """Work between steps that outlasts the deadline stops the search at that check: no step follows it."""
    ids, mask = prompts(tiny_policy, [4], 2)
    config = VEDConfig(num_candidates=8, init_beams=4, budget=34, deadline=time.perf_counter() + 60)
    late = [False]

    def past_the_deadline() -> None:
        late[0] = True

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("models.ved.time.perf_counter", lambda: 1e12 if late[0] else 0.0)
        (stats,) = ved_search(
            tiny_policy.model, head, tiny_policy.trie, ids, mask, config, between_steps=past_the_deadline
        ).stats
    assert stats.cap_hit and stats.stop_reason == "deadline" and stats.tokens_spent == stats.init_tokens


def test_deadline_passed_returns_the_initial_beam(tiny_policy: Policy, head: ValueHead) -> None:
    ids, mask = prompts(tiny_policy, [4, 2], 2)
    config = VEDConfig(num_candidates=8, init_beams=12, deadline=time.perf_counter() - 1.0)
    res = ved_search(tiny_policy.model, head, tiny_policy.trie, ids, mask, config)
    beam = beam_search(tiny_policy.model, tiny_policy.trie, ids, mask, BeamSearchConfig(12))
    for b, s in enumerate(res.stats):
        assert s.cap_hit and s.stop_reason == "deadline" and s.iterations == 0 and s.tokens_spent == s.init_tokens
        # ranked by path log-prob, the initial tree's best 8 are beam search's (width 12) best 8, in its order
        assert res.decode.sid_index[b].tolist() == beam.sid_index[b, :8].tolist()
        torch.testing.assert_close(res.log_probs[b], beam.scores[b, :8], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res.decode.scores[b], beam.scores[b, :8], rtol=1e-5, atol=1e-5)


def test_a_deadline_passing_within_a_step_ends_its_selections_at_the_first_child(
    tiny_policy: Policy, head: ValueHead, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline is read before each step and, once a child is made, within the step's selections: late in
    a search most selections fail the gate, and a step that ran them all ran on for tens of milliseconds past
    the deadline. A clock that passes the deadline right after the first step began: that step makes one child
    per prompt, not ``expansions_per_step``, and the search stops after it. A deadline never reached changes
    nothing."""
    ids, mask = prompts(tiny_policy, [4], 2)
    config = VEDConfig(num_candidates=8, init_beams=4, budget=34, expansions_per_step=4)  # < 36 prefixes: searched
    free = ved_search(tiny_policy.model, head, tiny_policy.trie, ids, mask, config)
    unreached = ved_search(tiny_policy.model, head, tiny_policy.trie, ids, mask, replace(config, deadline=1e12))
    assert torch.equal(unreached.decode.sid_index, free.decode.sid_index) and unreached.stats == free.stats
    reads = iter([0.0])  # the first read (run's, before the first step) is before the deadline; every later one after

    monkeypatch.setattr("models.ved.time.perf_counter", lambda: next(reads, 2.0))
    res = ved_search(tiny_policy.model, head, tiny_policy.trie, ids, mask, replace(config, deadline=1.0))
    (stats,) = res.stats
    assert free.stats[0].tokens_spent >= stats.init_tokens + 4  # unhurried, the first step makes its 4 children
    assert stats.cap_hit and stats.stop_reason == "deadline" and stats.tokens_spent == stats.init_tokens + 1


def test_deadline_with_more_candidates_than_beams_still_fills_them(tiny_policy: Policy, head: ValueHead) -> None:
    ids, mask = prompts(tiny_policy, [4, 2], 3)
    config = VEDConfig(num_candidates=20, init_beams=2, deadline=time.perf_counter() - 1.0)
    res = ved_search(tiny_policy.model, head, tiny_policy.trie, ids, mask, config)
    for row, s in zip(res.decode.ranked(), res.stats, strict=True):
        assert len(set(row)) == 20 and s.cap_hit and s.tokens_spent <= resolve_budget(config, 3)


@pytest.mark.parametrize("g", [16, 200])
def test_outputs_are_distinct_valid_sids_in_the_trie(tiny_policy: Policy, head: ValueHead, g: int) -> None:
    trie, tok = tiny_policy.trie, tiny_policy.tokenizer
    n_sids = len(tiny_policy.catalog.sids)
    ids, mask = prompts(tiny_policy, [1, 6], 4)
    res = ved_search(tiny_policy.model, head, trie, ids, mask, VEDConfig(num_candidates=g, budget=3 * g))
    assert res.decode.sid_index.shape == (2, g) and res.decode.token_ids.shape == (2, g, 3)
    for b, row in enumerate(res.decode.ranked()):
        assert len(row) == len(set(row)) == min(g, n_sids)
        for slot, sid in enumerate(row):
            tokens = res.decode.token_ids[b, slot].tolist()
            assert tuple(tok.convert_ids_to_tokens(tokens)) == tiny_policy.catalog.sids[sid]
            assert int(trie.leaf_sid[trie.node_of_token_ids(tokens)]) == sid
    empty = res.decode.sid_index < 0
    assert torch.all(res.decode.token_ids[empty] == -1) and torch.all(torch.isinf(res.decode.scores[empty]))


def test_seeded_and_deterministic(tiny_policy: Policy, head: ValueHead) -> None:
    ids, mask = prompts(tiny_policy, [3, 2], 5)
    config = VEDConfig(num_candidates=4, init_beams=4, budget=30)  # below the 36 prefixes: a search
    runs = [
        ved_search(tiny_policy.model, head, tiny_policy.trie, ids, mask, replace(config, seed=s)) for s in (7, 7, 8)
    ]
    assert torch.equal(runs[0].decode.sid_index, runs[1].decode.sid_index)
    assert torch.equal(runs[0].tree.token, runs[1].tree.token)
    assert not torch.equal(runs[0].tree.token, runs[2].tree.token)


def test_batched_equals_one_by_one(tiny_policy: Policy, head: ValueHead) -> None:
    lengths = [1, 4, 2]
    ids, mask = prompts(tiny_policy, lengths, 6)
    config = VEDConfig(num_candidates=12, budget=48, seed=3)
    batched = ved_search(tiny_policy.model, head, tiny_policy.trie, ids, mask, config)
    for b in range(len(lengths)):
        keep = mask[b] == 1
        one = ved_search(tiny_policy.model, head, tiny_policy.trie, ids[b : b + 1, keep], mask[b : b + 1, keep], config)
        assert one.decode.sid_index[0].tolist() == batched.decode.sid_index[b].tolist()
        torch.testing.assert_close(one.decode.scores[0], batched.decode.scores[b], rtol=1e-4, atol=1e-4)
        assert one.stats[0] == batched.stats[b]


@pytest.mark.parametrize("g", [16, 200])
def test_a_trie_of_the_offered_sids_is_all_the_search_returns(tiny_policy: Policy, head: ValueHead, g: int) -> None:
    """A service's items no longer offered (``SidTrie``'s keep): VED, fused, returns SIDs the trie holds only, and
    as many as it holds when more are asked for."""
    n_sids = len(tiny_policy.catalog.sids)
    keep = [s for s in range(n_sids) if s % 4]
    trie = SidTrie(tiny_policy.catalog, tiny_policy.token_id, keep)
    counts = TransitionCounts.fit([((i,), (i * 7) % 120) for i in range(120)])
    bonus = counts.node_bonus([(1,), (6,)], tiny_policy.catalog, trie, weight=3.0)
    ids, mask = prompts(tiny_policy, [1, 6], 4)
    res = ved_search(tiny_policy.model, head, trie, ids, mask, VEDConfig(num_candidates=g, budget=3 * g), bonus)
    for row in res.decode.ranked():
        assert len(row) == len(set(row)) == min(g, len(keep)) and set(row) <= set(keep)
