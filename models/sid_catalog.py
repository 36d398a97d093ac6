"""Semantic-ID catalog: items <-> SIDs, one SID to many items.

A SID is a tuple of ``depth`` tokens, one per residual-quantizer level, written
``<a_12><b_3><c_200>``. Several items may share a SID (the real Industrial index
has 31 such items), so the SID -> items map is one-to-many everywhere; decoders
work on SIDs and the catalog expands them to items at the edge.

The catalog is plain data (no torch): it is serialised into every checkpoint so
a checkpoint folder alone rebuilds the policy's output space.

Item ids are 0..N-1 inside vstar. A catalog may also know each item's *external
id*, the id its owner's own systems use (a SKU: what ``vstar import`` read, kept
in the data folder's ``item_map.json``): all items or none, each a distinct
non-empty string. They name items at the edge (the service's answers and
requests) and never take part in a decode or a score.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

LEVEL_PREFIXES = "abcdefgh"
_TOKEN_RE = re.compile(r"<([a-h])_(\d+)>", re.ASCII)
_SID_RE = re.compile(r"^(?:<[a-h]_\d+>)+$", re.ASCII)  # ASCII digits: int() reads others too


def _well_formed_sid() -> re.Pattern[str]:
    """A SID as ``parse_sid`` accepts it, in one pattern: letters in level order, codes without leading zeros."""
    pattern = ""
    for letter in reversed(LEVEL_PREFIXES):
        pattern = f"<{letter}_(?:0|[1-9][0-9]*)>" + (f"(?:{pattern})?" if pattern else "")
    return re.compile(pattern, re.ASCII)


# the fast path of parse_sid: a catalog of a million items is a million SIDs to read at every start
_WELL_FORMED_SID = _well_formed_sid()

Sid = tuple[str, ...]


def parse_sid(text: str, depth: int | None = None) -> Sid:
    """Split ``"<a_1><b_2><c_3>"`` into its tokens, checking the level letters and that codes are written
    without leading zeros (``<b_07>`` would be a token of its own, outside the vocabulary, for code 7).

    Raises ``ValueError`` naming the problem for anything else.
    """
    text = text.strip()
    if _WELL_FORMED_SID.fullmatch(text):
        tokens = tuple(f"<{t}>" for t in text[1:-1].split("><"))
        if depth is None or len(tokens) == depth:
            return tokens
    return checked_sid(text, depth)


def checked_sid(text: str, depth: int | None = None) -> Sid:
    """``parse_sid`` token by token (its slow path): the check that names what is wrong with a SID."""
    text = text.strip()
    if not _SID_RE.match(text):
        raise ValueError(f"malformed SID {text!r}: {_first_non_token(text, depth)}")
    tokens = tuple(f"<{m.group(1)}_{m.group(2)}>" for m in _TOKEN_RE.finditer(text))
    if len(tokens) > len(LEVEL_PREFIXES):  # the levels are the letters a..h: no token has a letter past them
        raise ValueError(f"malformed SID {text!r}: {len(tokens)} tokens, at most {len(LEVEL_PREFIXES)}")
    for level, token in enumerate(tokens):
        if token[1] != LEVEL_PREFIXES[level]:
            raise ValueError(
                f"malformed SID {text!r}: token {level + 1} is {token}, expected level letter {LEVEL_PREFIXES[level]!r}"
            )
        if code_text(token) != str(token_code(token)):  # the vocabulary and the trie spell codes without them
            raise ValueError(
                f"malformed SID {text!r}: token {level + 1} is {token}, a code with a leading zero; "
                f"write it {level_token(level, token_code(token))}"
            )
    if depth is not None and len(tokens) != depth:
        raise ValueError(f"malformed SID {text!r}: {_tokens(len(tokens))}, expected {depth}")
    return tokens


def _tokens(n: int) -> str:
    return f"{n} token{'' if n == 1 else 's'}"


def _first_non_token(text: str, depth: int | None) -> str:
    """Where a SID that is not all tokens goes wrong: the first piece of it that is no token, and its place."""
    example = "".join(level_token(level, level + 1) for level in range(depth or 3))
    if not text:
        return f"empty, expected tokens like {example}"
    start, count = 0, 0
    while (token := _TOKEN_RE.match(text, start)) is not None:
        start, count = token.end(), count + 1
    rest = text[start:]
    close, reopen = rest.find(">"), rest.find("<", 1)
    if close >= 0 and (reopen < 0 or close < reopen):
        piece = rest[: close + 1]  # a whole <...> that is no token
    else:
        piece = rest if reopen < 0 else rest[:reopen]  # an unclosed token, or text between tokens
    where = "at the start" if count == 0 else f"after {_tokens(count)}"
    return (
        f"{piece[:24]!r} {where} is no token: a token is <letter_code>, a level letter a-h and a code in decimal "
        f"digits, as in {example}"
    )


def sid_to_str(sid: Sequence[str]) -> str:
    return "".join(sid)


def code_text(token: str) -> str:
    """The code digits of a SID token as written: ``code_text("<b_07>") == "07"``."""
    return token[3:-1]


MAX_CODES = 65_536  # the largest SID code of any level, plus one: the width of the trie's and decoders' tables


def token_code(token: str) -> int:
    """The code of a SID token: ``token_code("<b_7>") == 7``; ``level_token`` is its inverse."""
    return int(code_text(token))


def level_token(level: int, code: int) -> str:
    """The token of code ``code`` at 0-based level ``level``: ``level_token(1, 7) == "<b_7>"``."""
    return f"<{LEVEL_PREFIXES[level]}_{code}>"


@dataclass(frozen=True)
class Item:
    item_id: int
    title: str
    sid: Sid


def external_ids_from_json(data: Mapping[str, Any]) -> dict[int, Any]:
    """``item_map.json``'s object (``{"0": "SKU-1", ...}``) keyed by item id; its values are checked against a
    catalog by ``external_ids_problem``. ``ValueError`` naming a key that is not an item id."""
    out: dict[int, Any] = {}
    keys: dict[int, str] = {}
    for key, value in data.items():
        if not re.fullmatch(r"[0-9]+", key):  # as index.json's keys: int() also reads " 1", "+1", "1_0"
            raise ValueError(f"key {key!r} is not an item id (decimal digits)")
        item_id = int(key)
        if item_id in keys:
            raise ValueError(f"keys {keys[item_id]!r} and {key!r} both name item {item_id}")
        keys[item_id] = key
        out[item_id] = value
    return out


def external_ids_problem(external_ids: Mapping[int, object], item_ids: Collection[int]) -> str | None:
    """What is wrong with ``external_ids`` (item id -> external id) as the map of a catalog of ``item_ids``,
    in a sentence; None when nothing is: its keys are exactly the items, its values distinct non-empty text."""
    missing = sorted(set(item_ids) - external_ids.keys())
    if missing:
        return f"no entry for {_some(missing)} of the catalog's {len(item_ids)} items: every item needs its own id"
    unknown = sorted(external_ids.keys() - set(item_ids))
    if unknown:
        return f"{_some(unknown)} {'is' if len(unknown) == 1 else 'are'} not in the catalog (another catalog's file?)"
    first: dict[str, int] = {}
    for item_id, external in sorted(external_ids.items()):
        if not isinstance(external, str) or not external:
            return f"item {item_id}: expected its own id as non-empty text, got {external!r:.60}"
        if external in first:
            return f"items {first[external]} and {item_id} both have the id {external!r:.60}: each item needs its own"
        first[external] = item_id
    return None


def _some(item_ids: Sequence[int], shown: int = 5) -> str:
    """``item 7``, ``items 3, 7, 9``, ``items 3, 7, 9, 10, 11 and 40 more``."""
    listed = ", ".join(map(str, item_ids[:shown]))
    more = f" and {len(item_ids) - shown} more" if len(item_ids) > shown else ""
    return f"item{'s' if len(item_ids) > 1 else ''} {listed}{more}"


@dataclass
class SidCatalog:
    """All items of a catalog with their SIDs.

    ``sids`` is the sorted list of distinct SIDs; a SID's position in it is its
    *sid index*, the id decoders return.
    """

    items: dict[int, Item]
    depth: int = 3
    external_ids: dict[int, str] | None = None  # item id -> its owner's id (item_map.json); None: not known
    sids: list[Sid] = field(init=False)
    sid_index: dict[Sid, int] = field(init=False)
    items_of_sid: list[list[int]] = field(init=False)
    item_of_external_id: dict[str, int] = field(init=False)  # the inverse of external_ids ({} without them)

    def __post_init__(self) -> None:
        if not self.items:
            raise ValueError("catalog is empty")
        if self.external_ids is not None:
            problem = external_ids_problem(self.external_ids, self.items.keys())
            if problem is not None:
                raise ValueError(f"external ids: {problem}")
        self.item_of_external_id = {e: i for i, e in (self.external_ids or {}).items()}
        for item in self.items.values():
            if len(item.sid) != self.depth:
                raise ValueError(
                    f"item {item.item_id} has SID {sid_to_str(item.sid)} of "
                    f"{_tokens(len(item.sid))}, expected {self.depth}"
                )
        self.sids = sorted({item.sid for item in self.items.values()})
        self.sid_index = {sid: i for i, sid in enumerate(self.sids)}
        self.items_of_sid = [[] for _ in self.sids]
        for item_id in sorted(self.items):
            self.items_of_sid[self.sid_index[self.items[item_id].sid]].append(item_id)

    @classmethod
    def from_index(cls, index: Mapping[str, Sequence[str]], titles: Mapping[int, str] | None = None) -> SidCatalog:
        """Build from MiniOneRec's ``index.json`` shape: ``{"0": ["<a_1>", "<b_2>", "<c_3>"]}``."""
        titles = titles or {}
        items: dict[int, Item] = {}
        keys: dict[int, str] = {}
        for key, tokens in index.items():
            if not re.fullmatch(r"[0-9]+", key):  # int() also reads " 1", "+1", "1_0" and other scripts' digits
                raise ValueError(f"index key {key!r} is not an item id (decimal digits)")
            item_id = int(key)
            if item_id in keys:  # "1" and "01": one would silently replace the other
                raise ValueError(f"index keys {keys[item_id]!r} and {key!r} both name item {item_id}")
            keys[item_id] = key
            items[item_id] = Item(item_id, titles.get(item_id, ""), parse_sid("".join(tokens)))
        lengths = Counter(len(item.sid) for item in items.values())
        depth = lengths.most_common(1)[0][0] if items else 3
        if len(lengths) > 1:  # name an item off the common length, not whichever came first
            odd = next(item for item in items.values() if len(item.sid) != depth)
            counts = ", ".join(f"{_tokens(length)}: {n} items" for length, n in lengths.most_common())
            raise ValueError(
                f"SIDs of mixed lengths ({counts}; e.g. item {odd.item_id}: {sid_to_str(odd.sid)}): "
                "every SID needs the same number of tokens"
            )
        return cls(items, depth=depth)

    def with_external_ids(self, external_ids: Mapping[int, str] | None) -> SidCatalog:
        """This catalog with ``external_ids`` (None: without any); ``ValueError`` saying what is wrong with them."""
        return replace(self, external_ids=None if external_ids is None else dict(external_ids))

    def external_ids_of(self, item_ids: Iterable[int]) -> list[str] | None:
        """The external ids of ``item_ids``, in their order; None when the catalog has none."""
        if self.external_ids is None:
            return None
        return [self.external_ids[i] for i in item_ids]

    def external_id_of(self, item_id: int) -> str | None:
        return None if self.external_ids is None else self.external_ids[item_id]

    def to_index(self) -> dict[str, list[str]]:
        return {str(i): list(item.sid) for i, item in sorted(self.items.items())}

    @property
    def num_items(self) -> int:
        return len(self.items)

    def tokens_of_level(self, level: int) -> list[str]:
        """Every token that occurs at ``level``, sorted by code."""
        codes = sorted({token_code(sid[level]) for sid in self.sids})
        return [level_token(level, c) for c in codes]

    def vocabulary(self) -> list[str]:
        """All SID tokens, level by level."""
        return [t for level in range(self.depth) for t in self.tokens_of_level(level)]

    def sid_of(self, item_id: int) -> Sid:
        try:
            return self.items[item_id].sid
        except KeyError:
            raise ValueError(f"unknown item id {item_id}") from None

    def items_of(self, sid: Sid) -> list[int]:
        idx = self.sid_index.get(tuple(sid))
        return [] if idx is None else self.items_of_sid[idx]

    def check_item_ids(self, item_ids: Iterable[int]) -> None:
        unknown = [i for i in item_ids if i not in self.items]
        if unknown:
            raise ValueError(f"unknown item ids: {unknown[:20]}")
