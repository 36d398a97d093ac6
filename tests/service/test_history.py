"""History entries resolved against the catalog: the error names each bad entry with the catalog's own SID shape."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.sid_catalog import SidCatalog, sid_to_str
from service.errors import InvalidInput
from service.history import fully_excluded_sids, resolve_entries, resolve_exclusions
from service.schemas import ExternalItemRef
from tests.conftest import make_catalog

SHARED = make_catalog(60, codes=(3, 2, 2))  # 60 items on at most 12 SIDs: most SIDs name several items


@pytest.mark.parametrize(("codes", "example"), [((6, 5), "<a_1><b_2>"), ((6, 5, 5, 4), "<a_1><b_2><c_3><d_4>")])
def test_a_malformed_sid_is_shown_the_catalogs_own_shape(codes: tuple[int, ...], example: str) -> None:
    # the example was <a_1><b_2><c_3> whatever the depth: "expected 2 tokens like <a_1><b_2><c_3>"
    catalog = make_catalog(30, codes=codes)
    with pytest.raises(InvalidInput, match=f"expected {len(codes)} tokens like {example}$"):
        resolve_entries(catalog, ["<a_1><b_2><c_3><d_4><e_5>"], "history")


def test_a_sid_of_more_tokens_than_levels_is_malformed_not_a_500(tiny_catalog: SidCatalog) -> None:
    # nine tokens, the ninth past the level letters a..h: parse_sid raised IndexError, and POST /recommend a 500
    nine = "<a_1><b_1><c_1><d_1><e_1><f_1><g_1><h_1><a_1>"
    with pytest.raises(InvalidInput, match=r"^history: malformed SIDs \['<a_1>.*\(1\): expected 3 tokens"):
        resolve_entries(tiny_catalog, [nine], "history")


def test_external_ids_resolve_to_their_items_and_unknown_ones_are_listed(tiny_catalog: SidCatalog) -> None:
    named = tiny_catalog.with_external_ids({i: f"SKU-{i}" for i in tiny_catalog.items})
    events = resolve_entries(named, [ExternalItemRef(external_id="SKU-7"), 7], "history")
    assert events[0] == events[1] and events[0].stored() == "7"  # stored by item id, as the same item given so
    with pytest.raises(InvalidInput, match=r"^items: unknown external ids \['7', 'SKU-x'\] \(2\)$"):
        resolve_entries(named, [ExternalItemRef(external_id="7"), ExternalItemRef(external_id="SKU-x")], "items")
    with pytest.raises(InvalidInput, match=r"^history: external ids \['SKU-7'\] \(1\) given, but this checkpoint"):
        resolve_entries(tiny_catalog, [ExternalItemRef(external_id="SKU-7")], "history")


def test_a_bare_string_keeps_its_meaning_where_it_is_also_an_external_id(tiny_catalog: SidCatalog) -> None:
    """Digits are an item id (and "5" is item 5 even where it is another item's SKU); the error names the form."""
    named = tiny_catalog.with_external_ids({i: str(90000 + i) if i else "5" for i in tiny_catalog.items})
    assert resolve_entries(named, ["5"], "history")[0].item_id == 5
    assert resolve_entries(named, [ExternalItemRef(external_id="5")], "history")[0].item_id == 0
    with pytest.raises(
        InvalidInput, match=r"""\['90003'\] \(1\) are external ids: send each as \{"external_id": \.\.\.\}$"""
    ):
        resolve_entries(named, ["90003"], "history")


def test_an_item_id_of_digits_is_its_number_however_many_leading_zeros(tiny_catalog: SidCatalog) -> None:
    """ "05" is item 5 (README), and so is "0...05" of more than 20 characters, as /items/0...05 is: the bound on an
    id's length counted its zeros, so it was an unknown item id. A number of more than 20 digits is still none."""
    for text, item_id in [("05", 5), ("0" * 30 + "5", 5), ("0" * 5000 + "17", 17), ("0" * 40, 0)]:
        assert [e.item_id for e in resolve_entries(tiny_catalog, [text], "history")] == [item_id]
    with pytest.raises(InvalidInput, match=r"^history: unknown item ids \['01000000000000000000005'\] \(1\)$"):
        resolve_entries(tiny_catalog, ["0" + "1" + "0" * 20 + "5"], "history")


@settings(max_examples=60, deadline=None)
@given(st.frozensets(st.integers(0, 59)))
def test_fully_excluded_sids_counts_the_sids_whose_every_item_is_excluded(excluded: frozenset[int]) -> None:
    """The extra beams exclusion needs: SIDs with all their items excluded, however many items share one."""
    assert fully_excluded_sids(SHARED, excluded) == sum(
        all(i in excluded for i in SHARED.items_of(sid)) for sid in SHARED.sids
    )


def test_exclusions_pass_over_what_the_catalog_does_not_know_and_name_what_can_name_no_item() -> None:
    """A blocklist may hold items added since training (no answer holds them): passed over, not a 422. What can
    name no item is refused as a history's entry is: a malformed SID, and a client's own id sent bare, which a
    pass-over would turn into a blocklisted item that stays recommendable."""
    named = SHARED.with_external_ids({i: f"SKU-{i}" for i in SHARED.items})
    sid = sid_to_str(SHARED.items[3].sid)
    assert resolve_exclusions(named, [7, "8", ExternalItemRef(external_id="SKU-9")]) == {7, 8, 9}
    assert resolve_exclusions(named, [sid]) == set(SHARED.items_of(SHARED.items[3].sid))  # a SID: all its items
    unknown = [99999, "123456", ExternalItemRef(external_id="SKU-new"), "<a_0><b_0><c_9>"]
    assert resolve_exclusions(named, [*unknown, 5]) == {5}
    with pytest.raises(InvalidInput, match=r"^exclude_items: malformed SIDs \['<a_1>'\] \(1\)"):
        resolve_exclusions(named, [5, "<a_1>"])
    digits = SHARED.with_external_ids({i: str(90000 + i) for i in SHARED.items})
    with pytest.raises(InvalidInput, match=r"^exclude_items: \['90004'\] \(1\) are external ids: send each as"):
        resolve_exclusions(digits, ["90004"])  # read as an unknown item id, it would exclude nothing
    with pytest.raises(InvalidInput, match=r"^exclude_items: malformed SIDs .*; \['SKU-4'\] \(1\) are external"):
        resolve_exclusions(named, ["SKU-4"])
    with pytest.raises(InvalidInput, match=r"^exclude_items: external ids \['SKU-4'\] \(1\) given, but"):
        resolve_exclusions(SHARED, [ExternalItemRef(external_id="SKU-4")])


@settings(max_examples=60, deadline=None)
@given(st.frozensets(st.integers(0, 59)), st.frozensets(st.integers(0, 59)))
def test_fully_excluded_sids_counts_only_the_sids_the_search_still_reaches(
    excluded: frozenset[int], unavailable: frozenset[int]
) -> None:
    """With items no longer offered (``service.availability``'s ``offered_of``: each SID holding one, its items
    still offered): a SID the exclusions and the unavailable items empty between them needs an extra beam, a
    SID the unavailable items alone empty is out of the trie and needs none."""
    index, items_of = SHARED.sid_index, SHARED.items_of_sid
    offered_of = {
        s: tuple(i for i in items_of[s] if i not in unavailable)
        for s in {index[SHARED.items[i].sid] for i in unavailable}
    }
    expected = sum(
        any(i in excluded for i in items_of[s])
        and all(i in excluded or i in unavailable for i in items_of[s])
        and not all(i in unavailable for i in items_of[s])
        for s in range(len(SHARED.sids))
    )
    assert fully_excluded_sids(SHARED, excluded, offered_of) == expected
