"""Ranking metrics (``training.evaluation.metrics``): what a ranked list can and cannot measure."""

from __future__ import annotations

import pytest

from tests.conftest import make_catalog
from training.evaluation.metrics import beyond_accuracy, rank_metrics


def test_a_cut_off_beyond_the_ranked_lists_is_not_a_measurement() -> None:
    lists, targets = [[1, 2, 3], [4, 5, 6]], [3, 9]
    m = rank_metrics(lists, targets, cutoffs=(1, 3, 5), catalog_size=10)
    assert m["HR@1"] == 0.0 and m["HR@3"] == 0.5 and m["NDCG@3"] == pytest.approx(0.5 / 2)
    assert m["HR@5"] is None and m["NDCG@5"] is None  # not HR@3 again: ranks 4 and 5 were never decoded
    # lists that rank every SID of the catalog: a target below them is a miss at any cut-off
    assert rank_metrics([[1, 2, 3]], [3], cutoffs=(5,), catalog_size=3) == {"HR@5": 1.0, "NDCG@5": 0.5}


def test_coverage_and_tail_share_beyond_the_lists_are_not_measured() -> None:
    catalog = make_catalog()
    short = [[0, 1, 2]] * 4
    assert beyond_accuracy(short, catalog, set(), k=10) == {"coverage@10": None, "tail_share@10": None}
    measured = beyond_accuracy(short, catalog, set(), k=3)
    assert measured["coverage@3"] is not None and measured["coverage@3"] > 0 and measured["tail_share@3"] == 0.0
