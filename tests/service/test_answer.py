"""``service.answer``: an answer survives the response cache's JSON, and a body that is not one is refused."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.answer import Answer, RankedSid, SearchReport

ranked = st.builds(
    RankedSid,
    sid=st.text(max_size=12),
    item_ids=st.lists(st.integers(0, 10**6), max_size=4),
    titles=st.lists(st.text(max_size=8), max_size=4),
    score=st.floats(allow_nan=False, allow_infinity=False),
)
report = st.builds(
    SearchReport,
    tokens_spent=st.integers(0, 10**4),
    nodes=st.integers(0, 10**4),
    max_depth=st.integers(0, 8),
    iterations=st.integers(0, 10**4),
    fallback=st.sampled_from([None, "initial_beam", "popular"]),
)


@given(st.builds(Answer, items=st.lists(ranked, max_size=5), cap_hit=st.booleans(), search=st.none() | report))
def test_an_answer_reads_back_as_itself(answer: Answer) -> None:
    assert Answer.from_json(answer.to_json()) == answer
    assert Answer.from_json(answer.to_json().decode()) == answer


@given(st.builds(Answer, items=st.lists(ranked, max_size=5), cap_hit=st.booleans(), search=st.none() | report))
def test_the_cached_bytes_are_the_layout_of_cache_format_1(answer: Answer) -> None:
    """Byte for byte the JSON of ``dataclasses.asdict``, which wrote CACHE_FORMAT 1's entries: replicas of
    one format share a Redis, so a faster encoding must not change what they read."""
    assert answer.to_json() == json.dumps(asdict(answer)).encode()


def entry(item: dict[str, object] | None = None, **fields: object) -> bytes:
    """A cache entry of one item (or none) with ``fields`` in place of the answer's own."""
    items = [{"sid": "x", "item_ids": [1], "titles": ["t"], "score": 0.5} | item] if item is not None else []
    search = {"tokens_spent": 1, "nodes": 2, "max_depth": 1, "iterations": 0, "fallback": None}
    return json.dumps({"items": items, "cap_hit": False, "search": search} | fields).encode()


@pytest.mark.parametrize(
    ("body", "wrong"),
    [
        (b"{not json", "JSONDecodeError: Expecting property name"),
        (b"[]", "TypeError: list indices must be integers"),
        (b'{"items": [], "cap_hit": false}', "KeyError: 'search'"),
        (
            b'{"items": [{"sid": "x", "extra": 1}], "cap_hit": false, "search": null}',
            "unexpected keyword argument 'extra'",
        ),
        (b'{"items": [], "cap_hit": false, "search": {"tokens_spent": 1}}', "missing 4 required positional arguments"),
        (b'{"items": 3, "cap_hit": false, "search": null}', "TypeError: items is a int, not a list"),
        # a dataclass takes values of any type: these read as answers that the wire response refused (a 500)
        (entry(items={}), "items is a dict, not a list"),  # iterated as its keys: served as no items
        (entry(cap_hit=None), "cap_hit is not of its type"),
        (entry({"sid": 1}), "sid is not"),
        (entry({"item_ids": "12"}), "item_ids is not"),
        (entry({"item_ids": [True]}), "item_ids is not"),
        (entry({"titles": [3]}), "titles is not"),
        (entry({"score": "high"}), "score is not"),
        (entry({"score": float("nan")}), "score is not"),  # served as "score": null
        (entry(search={"tokens_spent": "1", "nodes": 2, "max_depth": 1, "iterations": 0, "fallback": None}), "tokens"),
        (entry(search={"tokens_spent": 1, "nodes": 2, "max_depth": 1, "iterations": 0, "fallback": "x"}), "fallback"),
        # JSON Python reads but cannot take further: an integer score past float's range (isfinite raised
        # OverflowError) and nesting past the reader's depth (RecursionError); both escaped as a 500
        (entry({"score": 10**400}), "OverflowError: int too large"),
        (b'{"items": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "RecursionError: maximum recursion depth"),
    ],
)
def test_a_body_that_is_not_an_answer_is_refused_with_what_is_wrong(body: bytes, wrong: str) -> None:
    with pytest.raises(ValueError, match="not a cached answer: ") as refused:
        Answer.from_json(body)
    assert wrong in str(refused.value)


def test_the_entry_of_the_refusal_tests_is_an_answer() -> None:
    """What the cases above change is all that is wrong with them."""
    assert Answer.from_json(entry({})) == Answer(
        [RankedSid("x", [1], ["t"], 0.5)], False, SearchReport(1, 2, 1, 0, None)
    )
