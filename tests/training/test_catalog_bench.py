"""``vstar bench catalog`` on catalogs small enough to run anywhere."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from models.policy import Policy
from models.sid_catalog import token_code
from models.transition import TransitionCounts
from training.bench.catalog_bench import random_catalog, run_catalog_bench, trie_bytes, trie_wide_bonus
from vstar import app


def test_random_catalog_has_the_sids_asked_for() -> None:
    catalog = random_catalog(300, codebook=8, seed=1)
    assert len(catalog.sids) == catalog.num_items == 300  # distinct: one item per SID
    assert {token_code(t) for sid in catalog.sids for t in sid} <= set(range(8))
    with pytest.raises(ValueError, match="513 distinct SIDs need more than 8 codes per level"):
        random_catalog(513, codebook=8, seed=1)


def test_the_bench_checks_the_bonus_against_the_trie_wide_pass() -> None:
    result = run_catalog_bench((40, 400), batches=(1, 3), codebook=8, repeats=1)
    assert [r["sids"] for r in result["rows"]] == [40, 400]
    for row in result["rows"]:
        assert [c["batch"] for c in row["cells"]] == [1, 3]
        assert all(c["identical"] for c in row["cells"])
        assert row["row_per_node_bytes"] > row["trie_bytes"]  # the leaves' rows are what it saves
        assert 0 < row["python_bytes"] < row["trie_bytes"]  # measured, and not the per-node dict it once held


def test_the_reference_bonus_equals_node_bonus_with_several_rows(tiny_policy: Policy) -> None:
    catalog, trie = tiny_policy.catalog, tiny_policy.trie
    items = sorted(catalog.items)
    counts = TransitionCounts.fit([([a], b) for a, b in zip(items, items[3:] + items[:3], strict=True)], window=2)
    histories = [items[:2], items[5:9], [items[-1]], []]
    ours = counts.node_bonus(histories, catalog, trie, 2.0).dense()
    assert torch.count_nonzero(ours[3]) == 0 and torch.count_nonzero(ours[:3]) > 0
    assert torch.equal(ours, trie_wide_bonus(counts, histories, catalog, trie, 2.0))


def test_trie_bytes_counts_a_row_per_inner_node_and_the_spare(tiny_policy: Policy) -> None:
    trie = tiny_policy.trie
    held, per_node = trie_bytes(trie)
    row = trie.codebook_size * 12  # an int64 child id and a float32 mask entry per code
    assert trie.row_nbytes == row
    assert per_node - held == (trie.num_nodes - trie.num_inner_nodes - 1) * row


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sids", "600", "--codebook", "8"], "--sids 600 is more than the 512 distinct SIDs of 8 codes per level"),
        (["--sids", "5,100"], "--sids 5: give at least 10 SIDs"),
        # the trie refused it after the catalog was drawn, telling to renumber the codes of an index.json
        (["--sids", "20", "--codebook", "70000"], "--codebook': Input should be less than or equal to 65536"),
    ],
)
def test_bench_catalog_refuses_sizes_it_cannot_build(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["bench", "catalog", *args])
    assert result.exit_code == 2 and message in result.output, result.output
