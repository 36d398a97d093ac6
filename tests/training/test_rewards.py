"""Reward, advantage and TD formulas: hand-computed cases and hypothesis properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from training.rl.rewards import (
    ADV_EPS,
    batch_sibling_advantages,
    batch_standard_rewards,
    batch_value_rewards,
    default_level_weights,
    dense_reward,
    group_advantages,
    ranking_reward,
    resolve_level_weights,
    rule_reward,
    sibling_advantages,
    sid_embeddings,
    standard_reward,
    td_targets,
    terminal_reward,
)

# ---- hand-computed cases


def test_rule_reward_is_exact_match() -> None:
    assert rule_reward([3, 5, 7], 5) == [0.0, 1.0, 0.0]
    assert rule_reward([3, 7], 5) == [0.0, 0.0]


def test_ranking_reward_normalises_wrong_ranks_to_minus_one() -> None:
    # target at rank 1; wrong ranks 0, 2, 3 weigh 1/log2(2), 1/log2(4), 1/log2(5)
    z = 1.0 + 0.5 + 1 / math.log2(5)
    expected = [-1.0 / z, 0.0, -0.5 / z, -(1 / math.log2(5)) / z]
    assert ranking_reward([3, 5, 7, 9], 5) == pytest.approx(expected)
    assert ranking_reward([3, 7, 9], 5) == [0.0, 0.0, 0.0]  # target not reached: no ranking signal
    assert ranking_reward([5], 5) == [0.0]


def test_standard_reward_adds_rule_and_ranking() -> None:
    z = 1.0 + 1 / math.log2(3)
    assert standard_reward([3, 7, 5], 5) == pytest.approx([-1.0 / z, -(1 / math.log2(3)) / z, 1.0])


# Paths of the dense and sibling cases: the target is (1, 10, 100).
PATHS = [(1, 10, 100), (1, 10, 101), (1, 11, 102), (2, 12, 103), (2, 12, 104)]
TARGET = (1, 10, 100)
EMB = np.array([[1, 0], [0, 1], [-1, 0], [0, -1], [1, 0]], dtype=np.float32)  # per candidate SID


def test_dense_reward_by_prefix_bucket() -> None:
    r = dense_reward(PATHS, TARGET, EMB, np.array([1.0, 0.0]), (0.3, 0.5, 1.0))
    de = 1 - 0.5 / math.sqrt(0.5)  # 1 - cos(mean([0,-1],[1,0]), [1,0])
    expected = np.array(
        [
            [0.3, 0.5, 1.0],  # the target itself
            [0.3, 0.5, -1.0],  # shares two levels; cos([0,1], t) = 0
            [0.3, -1.0, -2.0],  # bucket (1, 11) = {[-1, 0]}: cos = -1
            [-0.3 * de, -0.5 * de, -1.0],  # buckets (2,) and (2, 12) = the mean of D and E
            [-0.3 * de, -0.5 * de, 0.0],  # E points at the target: no penalty at the leaf
        ]
    )
    np.testing.assert_allclose(r, expected, atol=1e-6)


def test_level_weights_are_the_papers_at_three_tokens_and_keep_its_shape_elsewhere() -> None:
    assert default_level_weights(3) == (0.3, 0.5, 1.0)
    assert default_level_weights(4) == pytest.approx((1 / 4, 1 / 3, 1 / 2, 1.0))
    assert default_level_weights(2) == (0.5, 1.0) and default_level_weights(1) == (1.0,)
    assert resolve_level_weights(None, 4) == default_level_weights(4)
    assert resolve_level_weights([0.1, 0.2, 0.7], 3) == (0.1, 0.2, 0.7)
    with pytest.raises(ValueError, match="3 dense-reward level weights .* SIDs of 4 tokens"):
        resolve_level_weights((0.3, 0.5, 1.0), 4)


def test_sid_embeddings_average_items_sharing_a_sid() -> None:
    item_emb = np.array([[1, 0], [0, 1], [0, 3]], dtype=np.float32)
    np.testing.assert_allclose(sid_embeddings([[0], [1, 2]], item_emb), [[1, 0], [0, 2]])


def test_group_advantages_hand_case_and_invalid_slots() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    valid = torch.tensor([[True, True, True, True, False], [True] * 5])
    adv = group_advantages(rewards, valid)
    std = 0.5  # unbiased std of [1, 0, 0, 0]
    expected = torch.tensor(
        [
            [0.75 / (std + ADV_EPS), -0.25 / (std + ADV_EPS), -0.25 / (std + ADV_EPS), -0.25 / (std + ADV_EPS), 0.0],
            [0.0] * 5,
        ]
    )
    torch.testing.assert_close(adv, expected)


def test_sibling_advantages_hand_case() -> None:
    rewards = [1.0, -0.5, -0.3, -0.2, -0.2]
    adv, weight = sibling_advantages(PATHS, rewards)

    def pair(a: float, b: float) -> tuple[float, float]:  # normalised two-child sibling set
        m, s = (a + b) / 2, abs(a - b) / math.sqrt(2)
        return (a - m) / (s + ADV_EPS), (b - m) / (s + ADV_EPS)

    l0 = pair((1.0 - 0.5 - 0.3) / 3, -0.2)  # children 1 (A, B, C) and 2 (D, E) of the root
    l1 = pair((1.0 - 0.5) / 2, -0.3)  # children 10 (A, B) and 11 (C) of (1,); (2,) has one child
    l2 = pair(1.0, -0.5)  # children 100 and 101 of (1, 10); the other parents have one child
    l2b = pair(-0.2, -0.2)  # children 103 and 104 of (2, 12): equal rewards, advantage 0
    expected_adv = np.array(
        [
            [l0[0], l1[0], l2[0]],
            [l0[0], l1[0], l2[1]],
            [l0[0], l1[1], 0.0],
            [l0[1], 0.0, l2b[0]],
            [l0[1], 0.0, l2b[1]],
        ]
    )
    expected_weight = np.array([[1 / 3, 1 / 2, 1], [1 / 3, 1 / 2, 1], [1 / 3, 1, 0], [1 / 2, 0, 1], [1 / 2, 0, 1]])
    np.testing.assert_allclose(adv, expected_adv, atol=1e-5)
    np.testing.assert_allclose(weight, expected_weight, atol=1e-6)


def test_td_targets_hand_case_and_detached() -> None:
    rewards = torch.tensor([[0.0, 0.3, 0.5, 1.0]])
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4]], requires_grad=True)
    target = td_targets(rewards, values, gamma=0.99)
    torch.testing.assert_close(target, torch.tensor([[0.99 * 0.2, 0.3 + 0.99 * 0.3, 0.5 + 0.99 * 0.4, 1.0]]))
    assert not target.requires_grad


def test_terminal_reward_only_on_the_last_level() -> None:
    np.testing.assert_array_equal(terminal_reward([1.0, 0.0], 3), [[0, 0, 1], [0, 0, 0]])


def test_batch_forms_skip_invalid_slots() -> None:
    sid_index = torch.tensor([[4, 2, -1], [7, 8, 9]])
    standard, rule = batch_standard_rewards(sid_index, [2, 5])
    torch.testing.assert_close(rule, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(standard, torch.tensor([[-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    tokens = torch.tensor([[[1, 10, 100], [1, 11, 101], [0, 0, 0]], [[1, 10, 100], [1, 10, 101], [2, 12, 102]]])
    adv, weight = batch_sibling_advantages(tokens, sid_index >= 0, standard)
    assert adv[0, 2].abs().sum() == 0 and weight[0, 2].sum() == 0
    v = batch_value_rewards(tokens, sid_index, tokens[:, 0], [0, 0], rule, None, None)
    assert v.shape == (2, 3, 4)
    torch.testing.assert_close(v[0, :, 3], torch.tensor([0.0, 1.0, 0.0]))
    assert v[..., :3].abs().sum() == 0


@pytest.mark.parametrize("norm", ["siblings", "group"])
def test_a_prompt_without_candidates_gets_no_sibling_advantage(norm: str) -> None:
    # beam search marks a prompt whose scores are all non-finite with -1 everywhere; the step goes on for the others
    sid_index = torch.tensor([[0, 1, 2], [-1, -1, -1]])
    tokens = torch.tensor([[[5, 6, 7], [5, 6, 8], [9, 6, 7]], [[-1, -1, -1]] * 3])
    standard, _ = batch_standard_rewards(sid_index, [1, 0])
    adv, weight = batch_sibling_advantages(tokens, sid_index >= 0, standard, norm)
    alone, alone_w = batch_sibling_advantages(tokens[:1], sid_index[:1] >= 0, standard[:1], norm)
    torch.testing.assert_close(adv[0], alone[0])
    torch.testing.assert_close(weight[0], alone_w[0])
    assert adv[1].abs().sum() == 0 and weight[1].sum() == 0


# ---- properties

distinct_candidates = st.lists(st.integers(0, 40), min_size=1, max_size=16, unique=True)


@given(distinct_candidates, st.data())
def test_ranking_penalties_sum_to_minus_one(cands: list[int], data: st.DataObject) -> None:
    target = data.draw(st.sampled_from(cands))
    r = ranking_reward(cands, target)
    wrong = [x for x, c in zip(r, cands, strict=True) if c != target]
    assert all(x < 0 for x in wrong) and r[cands.index(target)] == 0.0
    assert sum(wrong) == pytest.approx(-1.0 if wrong else 0.0)
    assert wrong == sorted(wrong)  # earlier wrong ranks are penalised more
    assert sum(standard_reward(cands, target)) == pytest.approx(1.0 if not wrong else 0.0)


@given(st.lists(st.lists(st.floats(-3, 3), min_size=2, max_size=16), min_size=1, max_size=4))
def test_group_advantages_have_zero_mean(groups: list[list[float]]) -> None:
    g = max(len(x) for x in groups)
    rewards = torch.zeros(len(groups), g)
    valid = torch.zeros(len(groups), g, dtype=torch.bool)
    for i, x in enumerate(groups):
        rewards[i, : len(x)] = torch.tensor(x)
        valid[i, : len(x)] = True
    adv = group_advantages(rewards, valid)
    assert torch.allclose(adv.sum(dim=1), torch.zeros(len(groups)), atol=1e-3)
    assert torch.all(adv[~valid] == 0)
    for i, x in enumerate(groups):  # order preserved within the group
        order = np.argsort(x, kind="stable")
        assert np.all(np.diff(adv[i, : len(x)].numpy()[order]) >= -1e-5)


paths_strategy = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2)), min_size=1, max_size=16, unique=True
)


@settings(max_examples=60)
@given(paths_strategy, st.data())
def test_sibling_advantages_sum_to_zero_per_level(paths: list[tuple[int, int, int]], data: st.DataObject) -> None:
    rewards = data.draw(st.lists(st.floats(-2, 2), min_size=len(paths), max_size=len(paths)))
    adv, weight = sibling_advantages(paths, rewards)
    # each child token counts once: per level, the weighted advantages of every sibling set sum to zero
    np.testing.assert_allclose((adv * weight).sum(axis=0), 0.0, atol=1e-3)
    for level in range(3):
        children = {p[: level + 1] for p in paths}
        parents_with_siblings = {h for h in {c[:-1] for c in children} if sum(c[:-1] == h for c in children) >= 2}
        in_sets = {c for c in children if c[:-1] in parents_with_siblings}
        assert weight[:, level].sum() == pytest.approx(len(in_sets))


@settings(max_examples=60)
@given(paths_strategy, st.data())
def test_dense_reward_bounds(paths: list[tuple[int, int, int]], data: st.DataObject) -> None:
    target = data.draw(st.sampled_from(paths))
    emb = np.random.default_rng(len(paths)).normal(size=(len(paths), 4)).astype(np.float32)
    t_emb = emb[paths.index(target)]
    r = dense_reward(paths, target, emb, t_emb, (0.3, 0.5, 1.0))
    w = np.array([0.3, 0.5, 1.0])
    assert np.all(r <= w + 1e-6) and np.all(r >= -2 * w - 1e-6)
    np.testing.assert_allclose(r[paths.index(target)], w)


@given(st.lists(st.floats(-2, 2), min_size=4, max_size=4), st.floats(0, 1))
def test_td_targets_with_zero_values_are_the_rewards(rewards: list[float], gamma: float) -> None:
    r = torch.tensor([rewards])
    torch.testing.assert_close(td_targets(r, torch.zeros_like(r), gamma), r)


def test_sibling_advantages_are_zero_when_every_candidate_ties() -> None:
    # a reward that float32 cannot hold: the children's means (over 1, 2 and 3 candidates) must still tie exactly
    paths = [(0, 0, 0), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 0, 2)]
    adv, weight = sibling_advantages(paths, [1.4623953784682717] * len(paths))
    assert weight.sum() > 0
    np.testing.assert_array_equal(adv, 0.0)


def test_sibling_advantages_scaled_by_the_group_keep_small_gaps_small() -> None:
    # two wrong children whose ranking penalties differ by 0.02: their own std blows the gap up to +-0.70;
    # scaled by the group's std (the target's +1 among them) the gap stays small, and the target's branch leads
    paths = [(1, 10, 100), (2, 20, 200), (3, 30, 300)]
    rewards = [1.0, -0.10, -0.08]
    own, _ = sibling_advantages(paths[1:], rewards[1:])
    gap_std = 0.02 / math.sqrt(2)
    np.testing.assert_allclose(own[:, 0], [-0.01 / (gap_std + ADV_EPS), 0.01 / (gap_std + ADV_EPS)], atol=1e-5)
    scale = float(np.std(rewards, ddof=1))
    by_group, weight = sibling_advantages(paths[1:], rewards[1:], scale=scale)
    np.testing.assert_allclose(by_group[:, 0], [-0.01 / (scale + ADV_EPS), 0.01 / (scale + ADV_EPS)], atol=1e-6)
    np.testing.assert_array_equal(weight[:, 0], [1.0, 1.0])
    full, _ = sibling_advantages(paths, rewards, scale=scale)
    mean = sum(rewards) / 3
    np.testing.assert_allclose(full[:, 0], [(r - mean) / (scale + ADV_EPS) for r in rewards], atol=1e-6)


def test_batch_sibling_advantages_group_norm_uses_each_groups_std() -> None:
    tokens = torch.tensor([[[1, 10, 100], [2, 20, 200], [3, 30, 300], [0, 0, 0]]])
    valid = torch.tensor([[True, True, True, False]])
    rewards = torch.tensor([[1.0, -0.10, -0.08, 0.0]])
    adv, weight = batch_sibling_advantages(tokens, valid, rewards, "group")
    scale = float(rewards[0, :3].double().std())
    mean = float(rewards[0, :3].double().mean())
    torch.testing.assert_close(adv[0, :3, 0], ((rewards[0, :3].double() - mean) / (scale + ADV_EPS)).float())
    assert adv[0, 3].abs().sum() == 0 and weight[0, 3].sum() == 0
    tied, _ = batch_sibling_advantages(tokens, valid, torch.zeros(1, 4), "group")  # no target reached: no signal
    assert tied.abs().sum() == 0
    with pytest.raises(ValueError, match="sibling norm"):
        batch_sibling_advantages(tokens, valid, rewards, "batch")
