"""The catalog's external ids: all items or none, distinct non-empty text, looked up both ways."""

from __future__ import annotations

import re

import pytest

from models.sid_catalog import SidCatalog, external_ids_from_json
from tests.conftest import make_catalog


def skus(catalog: SidCatalog) -> dict[int, str]:
    return {i: f"SKU-{i:03d}" for i in catalog.items}


def test_external_ids_are_looked_up_both_ways() -> None:
    catalog = make_catalog(30)
    named = catalog.with_external_ids(skus(catalog))
    assert named.external_id_of(7) == "SKU-007" and named.item_of_external_id["SKU-007"] == 7
    assert named.external_ids_of([9, 2]) == ["SKU-009", "SKU-002"]
    assert named.sids == catalog.sids and named.items_of_sid == catalog.items_of_sid  # naming changes no SID
    assert catalog.external_ids is None  # with_external_ids is a copy
    assert catalog.external_id_of(7) is None and catalog.external_ids_of([9, 2]) is None
    assert catalog.item_of_external_id == {}
    assert named.with_external_ids(None).external_ids is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop(3), "external ids: no entry for item 3 of the catalog's 30 items"),
        (lambda m: [m.pop(i) for i in range(8)], r"no entry for items 0, 1, 2, 3, 4 and 3 more of"),
        (lambda m: m.update({30: "SKU-X"}), r"item 30 is not in the catalog \(another catalog's file\?\)"),
        (lambda m: m.update({30: "X", 31: "Y"}), "items 30, 31 are not in the catalog"),
        (lambda m: m.update({4: ""}), "item 4: expected its own id as non-empty text, got ''"),
        (lambda m: m.update({4: 4}), "item 4: expected its own id as non-empty text, got 4"),
        (lambda m: m.update({4: None}), "item 4: expected its own id as non-empty text, got None"),
        (lambda m: m.update({9: "SKU-002"}), "items 2 and 9 both have the id 'SKU-002': each item needs its own"),
    ],
)
def test_bad_external_ids_are_refused_naming_the_problem(change, message: str) -> None:
    catalog = make_catalog(30)
    external = skus(catalog)
    change(external)
    with pytest.raises(ValueError, match=message):
        catalog.with_external_ids(external)
    with pytest.raises(ValueError, match=message):
        SidCatalog(catalog.items, catalog.depth, external)


def test_item_map_json_keys_are_item_ids_in_decimal_digits() -> None:
    assert external_ids_from_json({"0": "a", "12": "b"}) == {0: "a", 12: "b"}
    for key in (" 1", "+1", "1_0", "x", "٤"):
        with pytest.raises(ValueError, match=re.escape(f"key {key!r} is not an item id")):
            external_ids_from_json({key: "a"})
    with pytest.raises(ValueError, match="keys '1' and '01' both name item 1"):
        external_ids_from_json({"1": "a", "01": "b"})
