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
        (b'{"items": 3, "cap_hit": false, "search": null}', "TypeError: 'int' object is not iterable"),
    ],
)
def test_a_body_that_is_not_an_answer_is_refused_with_what_is_wrong(body: bytes, wrong: str) -> None:
    with pytest.raises(ValueError, match="not a cached answer: ") as refused:
        Answer.from_json(body)
    assert wrong in str(refused.value)
