"""Ranking metrics (``training.evaluation.metrics``): what a ranked list can and cannot measure."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from models.beam_search import DecodeResult
from models.policy import Policy
from models.sid_catalog import Item, SidCatalog, level_token
from tests.conftest import make_catalog
from training.data.dataset import RecDataset, Sample
from training.evaluation.decoders import Histories, beam_decoder
from training.evaluation.evaluate import rank_samples, score_rankings, warn_whole_catalog
from training.evaluation.metrics import beyond_accuracy, metrics_of_ranks, rank_metrics, tail_items


def test_a_cut_off_beyond_the_ranked_lists_is_not_a_measurement() -> None:
    lists, targets = [[1, 2, 3], [4, 5, 6]], [3, 9]
    m = rank_metrics(lists, targets, cutoffs=(1, 3, 5), catalog_size=10)
    assert m["HR@1"] == 0.0 and m["HR@3"] == 0.5 and m["NDCG@3"] == pytest.approx(0.5 / 2)
    assert m["HR@5"] is None and m["NDCG@5"] is None  # not HR@3 again: ranks 4 and 5 were never decoded
    # lists that rank every SID of the catalog: a target below them is a miss at any cut-off
    assert rank_metrics([[1, 2, 3]], [3], cutoffs=(5,), catalog_size=3) == {"HR@5": 1.0, "NDCG@5": 0.5}


def test_the_figures_of_ranks_are_rank_metrics_where_the_lists_measure_them() -> None:
    # a DDP rank whose own lists fall short of a cut-off still counts its hits: the whole batch may measure it
    lists, targets = [[1, 2, 3], [4, 5, 6], [7]], [3, 9, 7]
    m, ranks = rank_metrics(lists, targets, cutoffs=(1, 3, 5), catalog_size=10), [2, None, 0]
    assert metrics_of_ranks(ranks, (1, 3)) == {k: v for k, v in m.items() if v is not None}
    assert metrics_of_ranks(ranks, (5,)) == {"HR@5": 2 / 3, "NDCG@5": pytest.approx((0.5 + 1) / 3)}


def test_coverage_and_tail_share_beyond_the_lists_are_not_measured() -> None:
    catalog = make_catalog()
    short = [[0, 1, 2]] * 4
    assert beyond_accuracy(short, catalog, set(), k=10) == {"coverage@10": None, "tail_share@10": None}
    measured = beyond_accuracy(short, catalog, set(), k=3)
    assert measured["coverage@3"] is not None and measured["coverage@3"] > 0 and measured["tail_share@3"] == 0.0


def test_a_sid_listed_twice_takes_one_place_and_a_shared_sid_is_a_hit() -> None:
    sid = [tuple(level_token(lv, c) for lv, c in enumerate(codes)) for codes in ((0, 0, 0), (0, 0, 1), (1, 0, 0))]
    # items 0 and 1 share SID 0; item 2 has SID 1, item 3 SID 2
    catalog = SidCatalog({i: Item(i, "", sid[s]) for i, s in enumerate((0, 0, 1, 2))})
    rows = [Sample("u", (2,), 3), Sample("v", (2,), 1)]
    out = score_rankings([[0, 0, 2], [0, 1, 2]], rows, rows, catalog, cutoffs=(1, 2))
    # row u: SID 2 is second among the distinct SIDs (0, 2), not third; row v: item 1's SID 0 ranks first
    assert out["target_ranks"] == [1, 0]
    assert out["metrics"]["HR@2"] == 1.0 and out["metrics"]["NDCG@2"] == pytest.approx((1 / math.log2(3) + 1) / 2)
    assert out["metrics"]["HR@1"] == 0.5


def test_the_metrics_score_each_list_as_its_distinct_sids_whoever_calls_them() -> None:
    """Not only through ``score_rankings``: a list whose SID 5 comes twice ranks SID 3 second, not third, and
    recommends SID 5's items once in its top 2 beside SID 3's."""
    assert rank_metrics([[5, 5, 3]], [3], cutoffs=(2,), catalog_size=10) == {
        "HR@2": 1.0,
        "NDCG@2": pytest.approx(1 / math.log2(3)),
    }
    assert rank_metrics([[5, 5, 3]], [3], cutoffs=(3,), catalog_size=10) == {"HR@3": None, "NDCG@3": None}
    catalog = make_catalog()
    first, second = 0, 1
    tail = set(catalog.items_of_sid[second])
    out = beyond_accuracy([[first, first, second]], catalog, tail, k=2)
    listed = len(catalog.items_of_sid[first]) + len(catalog.items_of_sid[second])
    assert out == {
        "coverage@2": pytest.approx(listed / catalog.num_items),
        "tail_share@2": pytest.approx(len(tail) / listed),
    }


def test_tail_is_outside_the_most_popular_share_and_figures_count_every_item_of_a_sid() -> None:
    sid = [tuple(level_token(lv, c) for lv, c in enumerate(codes)) for codes in ((0, 0, 0), (0, 1, 0), (1, 0, 0))]
    sid.append((level_token(0, 1), level_token(1, 1), level_token(2, 0)))
    # items 0 and 1 share a SID; items 2, 3 and 4 have one each: 5 items, 4 SIDs
    catalog = SidCatalog({i: Item(i, "", sid[s]) for i, s in enumerate((0, 0, 1, 2, 3))})
    counts = Counter({0: 5, 1: 2, 2: 2, 4: 1})  # item 3 never trained on
    # the head is the 2 most popular of 5 items (0.4): item 0, then item 1 before item 2 (a tie: by item id)
    tail = tail_items(catalog, counts, head_share=0.4)
    assert tail == {2, 3, 4}
    shared, two, three = (catalog.sid_index[catalog.sid_of(i)] for i in (0, 2, 3))
    out = beyond_accuracy([[shared, two], [shared, three]], catalog, tail, k=2)
    # items 0, 1, 2, 3 of 5 are covered (4 of the catalog's 4 SIDs would say 1.0); the lists recommend
    # 2 + 1 items each, 6 in all, of which items 2 and 3 are in the tail (2 of 4 listed SIDs would say 0.5)
    assert out == {"coverage@2": pytest.approx(4 / 5), "tail_share@2": pytest.approx(2 / 6)}


def test_cut_offs_as_long_as_the_catalog_are_named_once(caplog: pytest.LogCaptureFixture) -> None:
    """A catalog of 3 SIDs, lists of all 3: HR@5 is 1 by construction (a small own catalog's HR@50 read 1.0)."""
    sid = [tuple(level_token(lv, c) for lv, c in enumerate(codes)) for codes in ((0, 0, 0), (0, 0, 1), (1, 0, 0))]
    catalog = SidCatalog({i: Item(i, "", sid[i]) for i in range(3)})
    rows = [Sample("u", (0,), 2)]
    warn_whole_catalog.cache_clear()  # once a process: another test may have met this catalog's size
    for _ in range(2):
        out = score_rankings([[0, 1, 2]], rows, rows, catalog, cutoffs=(1, 3, 5))
    assert out["metrics"]["HR@5"] == 1.0
    assert caplog.text.count("the catalog has 3 SIDs: at K = 3, 5 a list holds every one") == 1


def test_a_decoder_that_drops_prompts_is_an_error_not_misses(tiny_dataset: RecDataset, tiny_policy: Policy) -> None:
    """A batch of 4 prompts decoded into 3 lists: the fourth row would be scored with an empty list, a miss."""
    beam = beam_decoder(5)

    def drops_last(policy: Policy, ids: torch.Tensor, mask: torch.Tensor, histories: Histories) -> DecodeResult:
        out = beam(policy, ids, mask, histories)
        return DecodeResult(out.sid_index[:-1], out.scores[:-1], out.token_ids[:-1])

    rows = tiny_dataset.splits["test"][:4]
    assert len(rank_samples(tiny_policy, rows, beam, batch_size=4, progress=False)) == 4
    with pytest.raises(ValueError, match="the decoder returned 3 ranked lists for a batch of 4 prompts"):
        rank_samples(tiny_policy, rows, drops_last, batch_size=4, progress=False)
