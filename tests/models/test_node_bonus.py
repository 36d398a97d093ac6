"""The sparse fusion table reads as its dense table does."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.node_bonus import NodeBonus


def test_the_largest_entry_of_a_node_is_held_and_the_rest_read_zero() -> None:
    rows, nodes = torch.tensor([0, 0, 1, 0]), torch.tensor([4, 4, 2, 0])
    bonus = NodeBonus.from_entries(rows, nodes, torch.tensor([1.0, 3.0, 2.0, 0.5]), num_rows=2, num_nodes=6)
    want = torch.zeros(2, 6)
    want[0, 4], want[1, 2], want[0, 0] = 3.0, 2.0, 0.5
    assert torch.equal(bonus.dense(), want)
    # row 1's node 4 is not row 0's: the key tells rows apart
    assert bonus.at(torch.tensor([0, 1, 1]), torch.tensor([4, 4, 2])).tolist() == [3.0, 0.0, 2.0]


def test_an_empty_table_reads_zero_everywhere() -> None:
    bonus = NodeBonus.from_dense(torch.zeros(3, 5))
    assert bonus.table.shape == (3, 1)  # the zero column alone
    assert torch.equal(bonus.gather(torch.tensor([[0, 4], [1, 1], [2, 3]])), torch.zeros(3, 2))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda r: st.tuples(
            st.just(r),
            st.integers(1, 9).flatmap(
                lambda n: st.tuples(
                    st.just(n), st.lists(st.floats(0, 5, width=32), min_size=r * n, max_size=r * n), st.integers(1, 6)
                )
            ),
        )
    )
)
def test_lookups_equal_the_dense_tables(case: tuple[int, tuple[int, list[float], int]]) -> None:
    rows, (nodes, values, width) = case
    table = torch.tensor(values, dtype=torch.float32).reshape(rows, nodes)
    bonus = NodeBonus.from_dense(table)
    assert torch.equal(bonus.dense(), table)
    idx = torch.arange(rows * width).reshape(rows, width) % nodes  # any node of each row, repeats included
    assert torch.equal(bonus.gather(idx), table.gather(1, idx))
    kids = idx[:, None, :].expand(rows, 2, width)  # at(): rows broadcast against a block of nodes per row
    assert torch.equal(
        bonus.at(torch.arange(rows)[:, None, None], kids), table[torch.arange(rows)[:, None, None], kids]
    )
