"""The returned set of VED: the head by score, the exploratory slots over first-level codes not yet in it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.candidate_set import rank_candidates

NEG = float("-inf")


def test_hand_case_head_then_new_codes() -> None:
    score = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, NEG, 0.4]])
    code = torch.tensor([[0, 0, 1, 0, 2, 3, 2]])
    # head of 2 by score: 0, 1 (code 0); slot 3: best of an uncovered code -> 2 (code 1); slot 4 -> 4 (code 2)
    assert rank_candidates(score, code, 4, 2).tolist() == [[0, 1, 2, 4]]
    # every code covered: the best left by score (3, then 6); then the pool is spent: -1
    assert rank_candidates(score, code, 8, 5).tolist() == [[0, 1, 2, 4, 3, 6, -1, -1]]
    assert rank_candidates(score, code, 4, 0).tolist() == [[0, 1, 2, 3]]


def test_ties_go_to_the_lower_index_and_rows_are_independent() -> None:
    score = torch.tensor([[1.0, 1.0, 1.0], [NEG, 2.0, 1.0]])
    code = torch.tensor([[0, 1, 1], [0, 0, 0]])
    assert rank_candidates(score, code, 3, 1).tolist() == [[0, 1, 2], [1, 2, -1]]


def test_more_exploratory_slots_than_candidates_is_an_error() -> None:
    with pytest.raises(ValueError, match="explore_slots"):
        rank_candidates(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.long), 2, 3)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 3),  # rows
    st.integers(1, 12),  # pool slots
    st.integers(1, 8),  # g
    st.data(),
)
def test_properties(rows: int, k: int, g: int, data: st.DataObject) -> None:
    explore = data.draw(st.integers(0, g))
    raw = data.draw(st.lists(st.sampled_from([NEG, 0.0, 0.5, 1.0, 2.0]), min_size=rows * k, max_size=rows * k))
    codes = data.draw(st.lists(st.integers(0, 3), min_size=rows * k, max_size=rows * k))
    score, code = torch.tensor(raw).view(rows, k), torch.tensor(codes).view(rows, k)
    out = rank_candidates(score, code, g, explore)
    assert out.shape == (rows, g)
    for b in range(rows):
        picked = [i for i in out[b].tolist() if i >= 0]
        pool = [i for i in range(k) if score[b, i] > NEG]
        assert len(picked) == len(set(picked)) == min(g, len(pool)) and set(picked) <= set(pool)
        assert out[b, len(picked) :].eq(-1).all()  # -1 only after the pool ran out
        head = min(g - explore, len(pool))
        by_score = sorted(pool, key=lambda i: (-float(score[b, i]), i))
        assert picked[:head] == by_score[:head]
        covered = {int(code[b, i]) for i in picked[:head]}
        for i in picked[head:]:  # a new code while one is left, else the best left by score
            left = [j for j in by_score if j not in picked[: picked.index(i)]]
            fresh = [j for j in left if int(code[b, j]) not in covered]
            assert i == (fresh[0] if fresh else left[0])
            covered.add(int(code[b, i]))
