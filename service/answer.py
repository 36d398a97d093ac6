"""A recommendation answer as the service keeps it: ranked SIDs with their items, what a VED search spent,
and the JSON the response cache stores.

``Answer`` is frozen and plain (no pydantic): the request side (``service.recommender``) builds one from a
decode, or reads one from the cache, and builds the wire response from it. ``CACHE_FORMAT`` is the layout's
version and part of every cache key, so services that store answers differently never read each other's
entries in a shared Redis. A body that does not read as an answer, its layout or the type of any field (a
dataclass takes whatever it is given, and the wire response would refuse it: a 500), or what JSON holds and Python
cannot take (an integer score past a float's range, nesting past the reader's depth), raises ``ValueError``: the
cache treats it as a miss.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields

# the layout of a cached ``Answer``, part of the cache key: a service that stores answers another way must
# not read (or be read by) the entries of another version sharing its Redis, in a rolling upgrade
CACHE_FORMAT = 1


@dataclass(frozen=True)
class RankedSid:
    """One SID of an answer with its catalog items (the user's excluded ones dropped)."""

    sid: str
    item_ids: list[int]
    titles: list[str]
    score: float


@dataclass(frozen=True)
class SearchReport:
    """What a VED answer spent (``SearchStats`` on the wire); ``fallback``: initial_beam, popular or None."""

    tokens_spent: int
    nodes: int
    max_depth: int
    iterations: int
    fallback: str | None


@dataclass(frozen=True)
class Answer:
    """A decode's answer to one request, as the response cache stores it (JSON)."""

    items: list[RankedSid]
    cap_hit: bool
    search: SearchReport | None

    def to_json(self) -> bytes:
        # the JSON ``dataclasses.asdict`` would give, without its deep copy of every list (the dataclasses are
        # flat, so each one's ``vars`` is its fields in order)
        search = vars(self.search) if self.search is not None else None
        items = [vars(it) for it in self.items]
        return json.dumps({"items": items, "cap_hit": self.cap_hit, "search": search}).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Answer:
        """Raises ``ValueError`` on a body that is not an answer of this layout (``CACHE_FORMAT``)."""
        try:
            body = json.loads(raw)
            search = SearchReport(**body["search"]) if body["search"] is not None else None
            if not isinstance(body["items"], list):  # an object would iterate as its keys: {} as no items
                raise TypeError(f"items is a {type(body['items']).__name__}, not a list")
            answer = cls([RankedSid(**it) for it in body["items"]], body["cap_hit"], search)
            _check_types(answer)
        # OverflowError: an integer score past float's range; RecursionError: nesting past the JSON reader's depth
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError) as e:
            raise ValueError(f"not a cached answer: {type(e).__name__}: {e}") from None
        return answer


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_types(answer: Answer) -> None:
    """``TypeError`` naming the first field whose JSON value is not of its type (a finite number for a score)."""
    checks = [("cap_hit", isinstance(answer.cap_hit, bool))]
    for it in answer.items:
        checks += [
            ("sid", isinstance(it.sid, str)),
            ("item_ids", isinstance(it.item_ids, list) and all(_is_int(i) for i in it.item_ids)),
            ("titles", isinstance(it.titles, list) and all(isinstance(t, str) for t in it.titles)),
            ("score", (_is_int(it.score) or isinstance(it.score, float)) and math.isfinite(it.score)),
        ]
    if answer.search is not None:
        counts = [f.name for f in fields(SearchReport) if f.name != "fallback"]
        checks += [(name, _is_int(getattr(answer.search, name))) for name in counts]
        checks.append(("fallback", answer.search.fallback in (None, "initial_beam", "popular")))
    wrong = next((name for name, ok in checks if not ok), None)
    if wrong is not None:
        raise TypeError(f"{wrong} is not of its type")
