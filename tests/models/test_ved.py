"""VED: the tree formulas on a hand-built tree, then contracts of the search on the tiny policy.

Hand cases pin U, the gate, the descent, backup and the entropy over valid
children; the search is checked for budget accounting, the exhaustive-budget
optimum (brute force over every catalog SID with the same value definition,
V at the SID's last token from a full forward), the anytime fallback,
validity, determinism and batched == one-by-one.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator

import pytest
import torch

from models.beam_search import BeamSearchConfig, beam_search, prompt_position_ids
from models.policy import Policy, pad_left
from models.search_tree import SearchTree, valid_entropy
from models.value_head import ValueHead, value_head_for
from models.ved import VEDConfig, gumbel_noise, resolve_budget, ved_search

NEG = float("-inf")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: thread hand-offs cost more than the work on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the tree formulas, by hand -------------------------------------------------------------


def lp(*probs: float) -> list[float]:
    return [math.log(p) if p > 0 else NEG for p in probs]


def entropy(*probs: float) -> float:
    return -sum(p * math.log(p) for p in probs if p > 0)


def hand_tree(root_value: float = 0.0) -> SearchTree:
    """root -> a (code 0), b (code 1), code 2 unexpanded; a -> a0 (leaf, code 0), code 1 unexpanded.

    lam = 0.5. G(root) = root_value + 0.5 H(.5, .3, .2); G(a) = 1 + 0.5 H(.6, .4);
    G(b) = 0.2 (one valid child: H = 0); G(a0) = 0.7. Visits: root 3, a 2, b 1, a0 1.
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
    add(1, 0, 0.7, [NEG] * 3)  # a0 = 3, a complete SID
    return tree


def g_values(root_value: float = 0.0) -> list[float]:
    return [root_value + 0.5 * entropy(0.5, 0.3, 0.2), 1.0 + 0.5 * entropy(0.6, 0.4), 0.2, 0.7]


def test_entropy_is_over_valid_children_renormalised() -> None:
    out = valid_entropy(torch.tensor([lp(0.2, 0.1, 0.1, 0), [NEG] * 4]))
    torch.testing.assert_close(out, torch.tensor([1.5 * math.log(2), 0.0]))


def test_hand_tree_bookkeeping() -> None:
    tree = hand_tree()
    torch.testing.assert_close(tree.score[0, :4], torch.tensor(g_values()))
    assert tree.visits[0, :4].tolist() == [3, 2, 1, 1]
    assert tree.expandable()[0, :4].tolist() == [True, True, True, False]
    assert tree.open_nodes()[0, :4].tolist() == [True, True, True, False]
    assert tree.path[0, 3].tolist() == [1, 3] and tree.depth[0, :4].tolist() == [0, 1, 1, 2]
    # path log-prob: the policy's (unrenormalised) log-probs along root -> a -> a0
    assert math.isclose(float(tree.log_prob[0, 3]), math.log(0.5 * 0.3), rel_tol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 1.0, 10.0])
def test_u_formula(beta: float) -> None:
    tree = hand_tree()
    g, n = g_values(), [3, 2, 1, 1]
    want = [g[i] + beta * math.sqrt(math.log(3 + 1) / (n[i] + 1)) for i in range(4)]
    torch.testing.assert_close(tree.u_score(beta)[0, :4], torch.tensor(want))


@pytest.mark.parametrize(
    ("root_value", "beta", "selected"),
    [
        (0.0, 1.0, 1),  # U: root 1.10 (self) < a 2.02 > b 1.03; at a, a0 is closed -> a
        (2.0, 1.0, 0),  # U(root) = 3.10 beats its children: widen level 1
        (0.0, 10.0, 2),  # exploration dominates: b (fewest visits) 8.53 > a 8.13 > root 6.40
        (0.0, 0.0, 1),  # pure G: a 1.34 > root 0.51 > b 0.2
    ],
)
def test_descent_by_u(root_value: float, beta: float, selected: int) -> None:
    tree = hand_tree(root_value)
    assert tree.select(torch.tensor([True]), beta).tolist() == [selected]
    assert tree.select(torch.tensor([False]), beta).tolist() == [-1]


def test_gate_against_depth_mean() -> None:
    tree = hand_tree()
    g = g_values()
    torch.testing.assert_close(tree.depth_mean()[0], torch.tensor([g[0], (g[1] + g[2]) / 2, g[3]]))
    # root: its own mean; a: above the depth-1 mean; b: below; a0: alone at its depth
    assert [bool(tree.passes_gate(torch.tensor([i]))) for i in range(4)] == [True, True, False, True]
    assert not bool(tree.passes_gate(torch.tensor([-1])))


def test_backup_and_sampling_from_unexpanded_codes() -> None:
    tree = hand_tree()
    tree.backup(torch.tensor([0]), torch.tensor([3]))
    assert tree.visits[0, :4].tolist() == [4, 3, 1, 2]
    noise = torch.randn(64, 3) * 10
    rows = torch.zeros(64, dtype=torch.long)
    assert set(tree.sample_child(rows, torch.zeros(64, dtype=torch.long), noise).tolist()) == {2}
    assert set(tree.sample_child(rows, torch.ones(64, dtype=torch.long), noise).tolist()) == {1}


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


def test_ranked_leaves_by_value_then_log_prob() -> None:
    tree = SearchTree.empty(1, 6, 4, 1, lam=0.0, device=torch.device("cpu"))
    zero = torch.zeros(1, dtype=torch.long)
    tree.evaluate(zero, zero, torch.tensor([0.0]), torch.tensor([lp(0.4, 0.3, 0.2, 0.1)]))
    rows = torch.zeros(4, dtype=torch.long)
    nodes = tree.allocate(rows, torch.zeros(4, dtype=torch.long), torch.arange(4), torch.arange(4), torch.arange(4))
    tree.evaluate(rows, nodes, torch.tensor([0.1, 0.5, 0.1, 0.3]), torch.full((4, 4), NEG))
    assert tree.ranked_leaves(6).tolist() == [[2, 4, 1, 3, -1, -1]]


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


def brute_force_values(policy: Policy, head: ValueHead, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """V at every state s_0..s_D of every catalog SID by one full forward per prompt: (B, S, D+1)."""
    trie, tok = policy.trie, policy.tokenizer
    sids = torch.tensor([tok.convert_tokens_to_ids(list(s)) for s in policy.catalog.sids])  # (S, D)
    out = []
    for b in range(ids.shape[0]):
        seq = torch.cat([ids[b].expand(len(sids), -1), sids], dim=1)  # (S, T+D)
        m = torch.cat([mask[b].expand(len(sids), -1), torch.ones_like(sids)], dim=1)
        with torch.no_grad():
            pos = prompt_position_ids(m)
            run = policy.model(input_ids=seq, attention_mask=m, position_ids=pos, output_hidden_states=True)
            out.append(head(run.hidden_states[-1], m)[:, -(trie.depth + 1) :])
    return torch.stack(out)


def test_resolve_budget() -> None:
    assert resolve_budget(VEDConfig(), 3) == 64  # 2 x beam search of width 16: 2 x 16 x 2
    assert resolve_budget(VEDConfig(num_candidates=2), 3) == 24  # raised to 3 x max(8, 2)
    assert resolve_budget(VEDConfig(budget=50), 3) == 50
    with pytest.raises(ValueError, match="budget 40"):
        resolve_budget(VEDConfig(num_candidates=16, budget=40), 3)
    with pytest.raises(ValueError, match="init_beams"):
        VEDConfig(init_beams=0)


def test_budget_accounting(tiny_policy: Policy, head: ValueHead) -> None:
    ids, mask = prompts(tiny_policy, [2, 5, 3], 0)
    res = ved_search(tiny_policy.model, head, tiny_policy.trie, ids, mask, VEDConfig(num_candidates=8, budget=40))
    for s in res.stats:
        # initial tree, by hand: all 6 level-1 codes (< 8 beams), 8 level-2 prefixes, 8 complete SIDs
        assert s.init_tokens == 6 + 8 + 8
        assert s.tokens_spent == s.budget == 40 and s.stop_reason == "budget" and not s.cap_hit
        assert s.nodes == s.tokens_spent + 1 and s.max_depth == 3
        assert s.iterations >= s.tokens_spent - s.init_tokens + s.gate_failures
    live = res.tree.live.sum(1)
    assert live.tolist() == [41, 41, 41]


@pytest.mark.parametrize("per_step", [1, 8])
def test_exhaustive_budget_finds_the_true_top_by_value(tiny_policy: Policy, head: ValueHead, per_step: int) -> None:
    trie = tiny_policy.trie
    ids, mask = prompts(tiny_policy, [3, 1], 1)
    g = 10
    config = VEDConfig(num_candidates=g, budget=trie.num_nodes - 1, expansions_per_step=per_step)
    res = ved_search(tiny_policy.model, head, trie, ids, mask, config)
    brute = brute_force_values(tiny_policy, head, ids, mask)  # (B, S, D+1)
    for b, s in enumerate(res.stats):
        assert s.stop_reason == "exhausted" and s.tokens_spent == trie.num_nodes - 1
        assert s.leaves == len(tiny_policy.catalog.sids)
        want = brute[b, :, -1].argsort(descending=True)[:g]
        assert res.decode.sid_index[b].tolist() == want.tolist()
        torch.testing.assert_close(res.decode.scores[b], brute[b, want, -1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(res.path_values[b], brute[b, want], rtol=1e-4, atol=1e-4)


def test_deadline_passed_returns_the_initial_beam(tiny_policy: Policy, head: ValueHead) -> None:
    ids, mask = prompts(tiny_policy, [4, 2], 2)
    config = VEDConfig(num_candidates=8, deadline=time.perf_counter() - 1.0)
    res = ved_search(tiny_policy.model, head, tiny_policy.trie, ids, mask, config)
    beam = beam_search(tiny_policy.model, tiny_policy.trie, ids, mask, BeamSearchConfig(8))
    for b, s in enumerate(res.stats):
        assert s.cap_hit and s.stop_reason == "deadline" and s.iterations == 0 and s.tokens_spent == s.init_tokens
        assert sorted(res.decode.sid_index[b].tolist()) == sorted(beam.sid_index[b].tolist())
        # the candidates' path log-probs are beam search's scores
        order = [beam.sid_index[b].tolist().index(i) for i in res.decode.sid_index[b].tolist()]
        torch.testing.assert_close(res.log_probs[b], beam.scores[b, order], rtol=1e-5, atol=1e-5)
        assert torch.all(res.decode.scores[b, :-1] >= res.decode.scores[b, 1:])


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
    runs = [ved_search(tiny_policy.model, head, tiny_policy.trie, ids, mask, VEDConfig(seed=s)) for s in (7, 7, 8)]
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
