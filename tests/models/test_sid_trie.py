"""SID catalog and trie: parsing, one-to-many SIDs, and the dense children table (property tests)."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from models.policy import Policy
from models.sid_catalog import Item, SidCatalog, checked_sid, level_token, parse_sid
from models.sid_tokenizer import add_sid_tokens, build_sid_tokenizer
from models.sid_trie import SidTrie


def test_parse_sid() -> None:
    assert parse_sid("<a_1><b_22><c_333>") == ("<a_1>", "<b_22>", "<c_333>")
    for bad in ("<a_1><b_2", "<b_1><a_2><c_3>", "a_1b_2c_3", ""):
        with pytest.raises(ValueError, match="malformed SID"):
            parse_sid(bad)
    with pytest.raises(ValueError, match="expected 3"):
        parse_sid("<a_1><b_2>", depth=3)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("<a_1><b_2><c_3", "'<c_3' after 2 tokens is no token"),  # each said "expected tokens like <a_1><b_2><c_3>"
        ("<a_1> <b_2><c_3>", "' ' after 1 token is no token"),
        ("<a_1>,<b_2>,<c_3>", "',' after 1 token is no token"),
        ("<a_1><b_2><z_3>", "'<z_3>' after 2 tokens is no token"),
        ("<A_1><b_2><c_3>", "'<A_1>' at the start is no token"),
        ("<a_-1><b_2><c_3>", "'<a_-1>' at the start is no token"),
        ("<a_1><b_2><c_3>x", "'x' after 3 tokens is no token"),
        ("a_1b_2c_3", "'a_1b_2c_3' at the start is no token"),
        ("  ", "empty, expected tokens like <a_1><b_2><c_3>"),
        ("<a_1><b_2>", "2 tokens, expected 3"),
        ("<a_1>", "1 token, expected 3"),
    ],
)
def test_a_malformed_sid_is_refused_naming_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=f"^malformed SID {re.escape(repr(text.strip()))}: {re.escape(problem)}"):
        parse_sid(text, depth=3)


def test_the_example_of_a_malformed_sid_has_the_depth_asked_for() -> None:
    with pytest.raises(ValueError, match="as in <a_1><b_2>$"):
        parse_sid("<a_1>;", depth=2)
    with pytest.raises(ValueError, match="like <a_1><b_2><c_3><d_4>$"):
        parse_sid("", depth=4)


def test_a_code_is_written_as_the_vocabulary_writes_it() -> None:
    # "<b_07>" is no token of the vocabulary (level_token writes "<b_7>"): the prompt read it as <unk>, and the
    # trie put "<a_1><b_07>" and "<a_1><b_7>" on one leaf, leaving one of the two SIDs unreachable
    assert parse_sid("<a_0><b_10><c_7>") == ("<a_0>", "<b_10>", "<c_7>")
    for bad, token in (("<a_1><b_07>", "<b_07>"), ("<a_00><b_7>", "<a_00>")):
        with pytest.raises(ValueError, match=f"{token}, a code with a leading zero; write it"):
            parse_sid(bad)
    with pytest.raises(ValueError, match="malformed SID"):
        parse_sid("<a_\u0661><b_7>")  # an Arabic-Indic digit one, which int() reads as 1


_token_text = st.builds(
    lambda letter, code: f"<{letter}_{code}>",
    st.sampled_from("abcdefghz"),
    st.sampled_from(["0", "7", "00", "07", "10", "255", "\u0661", ""]),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_token_text, max_size=9).map("".join) | st.text(alphabet="<>_abc0179 ", max_size=24),
    st.none() | st.integers(1, 4),
)
def test_the_fast_path_reads_every_sid_as_the_check_does(text: str, depth: int | None) -> None:
    """``parse_sid`` takes a well-formed SID without its token-by-token check; it must accept and refuse exactly
    what the check does, with the check's message."""
    try:
        want: tuple[str, ...] | str = checked_sid(text, depth)
    except ValueError as e:
        want = str(e)
    try:
        got: tuple[str, ...] | str = parse_sid(text, depth)
    except ValueError as e:
        got = str(e)
    assert got == want


def test_sids_of_mixed_lengths_name_an_item_off_the_common_length() -> None:
    # the depth was the first item's: one short SID first in index.json blamed every other item for it
    index = {"0": ["<a_1>", "<b_2>"]} | {str(i): ["<a_1>", "<b_2>", f"<c_{i}>"] for i in range(1, 5)}
    message = r"mixed lengths \(3 tokens: 4 items, 2 tokens: 1 items; e.g. item 0: <a_1><b_2>\)"
    with pytest.raises(ValueError, match=message):
        SidCatalog.from_index(index)
    assert SidCatalog.from_index({"0": ["<a_1>", "<b_2>"], "1": ["<a_1>", "<b_3>"]}).depth == 2


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["1", "01"], "index keys '1' and '01' both name item 1"),  # one replaced the other, silently
        (["1", "+2"], r"index key '\+2' is not an item id \(decimal digits\)"),
        (["1", " 2"], r"index key ' 2' is not an item id"),
    ],
)
def test_index_keys_name_one_item_each(keys: list[str], message: str) -> None:
    index = {key: ["<a_1>", "<b_2>", f"<c_{i}>"] for i, key in enumerate(keys)}
    with pytest.raises(ValueError, match=message):
        SidCatalog.from_index(index)


def test_shared_sid_keeps_all_items() -> None:
    sid = ("<a_0>", "<b_0>", "<c_0>")
    cat = SidCatalog({1: Item(1, "x", sid), 2: Item(2, "y", sid), 3: Item(3, "z", ("<a_1>", "<b_0>", "<c_0>"))})
    assert cat.items_of(sid) == [1, 2] and len(cat.sids) == 2
    with pytest.raises(ValueError, match="unknown item id 9"):
        cat.sid_of(9)


sid_lists = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 4), st.integers(0, 9)), min_size=1, max_size=60)


@settings(max_examples=40, deadline=None)
@given(sid_lists)
def test_trie_children_match_brute_force(codes: list[tuple[int, int, int]]) -> None:
    items = {i: Item(i, "", tuple(level_token(lv, c) for lv, c in enumerate(sid))) for i, sid in enumerate(codes)}
    cat = SidCatalog(items)
    tok = build_sid_tokenizer(cat.vocabulary())
    trie = SidTrie(cat, tok.convert_tokens_to_ids)
    distinct = sorted(set(codes))
    for depth in range(3):
        for prefix in {c[:depth] for c in distinct}:
            ids = tok.convert_tokens_to_ids([level_token(lv, c) for lv, c in enumerate(prefix)])
            expected = sorted({c[depth] for c in distinct if c[:depth] == prefix})
            got = sorted(int(t[3:-1]) for t in tok.convert_ids_to_tokens(trie.allowed_token_ids(ids)))
            assert got == expected
            node = trie.node_of_token_ids(ids)
            assert int(trie.leaf_counts()[node]) == sum(c[:depth] == prefix for c in distinct)  # SIDs under it
    leaves = [int(trie.leaf_sid[trie.node_of_token_ids(tok.convert_tokens_to_ids(list(s)))]) for s in cat.sids]
    assert leaves == list(range(len(cat.sids)))
    every = torch.arange(-1, trie.num_nodes)  # -1: an unused slot's id
    kids = trie.child_nodes(every)
    assert torch.equal(trie.mask_rows(every) == 0, kids >= 0)
    assert torch.equal(trie.child_node(every, torch.zeros_like(every)), kids[:, 0])
    # a leaf, or an id that is no node, has no child
    assert bool((kids[(every < 0) | (trie.node_depth[every.clamp(min=0)] == trie.depth)] == -1).all())
    parent_of = {int(k): int(n) for n, row in zip(every.tolist(), kids, strict=True) for k in row if k >= 0}
    assert parent_of == {n: int(trie.parent[n]) for n in range(1, trie.num_nodes)}  # each node under its parent
    # the counts decoders read as plain ints: nodes per level (distinct prefixes), and complete SIDs
    assert trie.level_sizes == [len({c[:depth] for c in distinct}) for depth in range(trie.depth + 1)]
    assert trie.level_sizes == [int((trie.node_depth == d).sum()) for d in range(trie.depth + 1)]
    assert trie.num_sids == len(distinct) == int((trie.leaf_sid >= 0).sum())


def test_invalid_prefix_has_no_children(tiny_policy: Policy) -> None:
    trie = tiny_policy.trie
    assert trie.allowed_token_ids([0]) == [] and trie.node_of_token_ids([0]) == -1
    assert trie.allowed_token_ids(tiny_policy.tokenizer.convert_tokens_to_ids(list(tiny_policy.catalog.sids[0]))) == []


def test_a_token_of_another_level_is_no_prefix() -> None:
    """Codes are local to a level: <b_1> names code 1 of level 1 only, so a prefix that opens with it reaches
    no node, even though level 0 has a code 1 too."""
    sids = [(1, 0, 0), (0, 1, 0)]
    cat = SidCatalog({i: Item(i, "", tuple(level_token(lv, c) for lv, c in enumerate(s))) for i, s in enumerate(sids)})
    tok = build_sid_tokenizer(cat.vocabulary())
    trie = SidTrie(cat, tok.convert_tokens_to_ids)
    assert trie.allowed_token_ids(tok.convert_tokens_to_ids(["<a_1>"])) == tok.convert_tokens_to_ids(["<b_0>"])
    for wrong in (["<b_1>"], ["<a_0>", "<a_1>"], ["<a_0>", "<c_0>"]):
        ids = tok.convert_tokens_to_ids(wrong)
        assert trie.node_of_token_ids(ids) == -1 and trie.allowed_token_ids(ids) == [], wrong


def test_prompt_tokenizes_every_sid_token(tiny_policy: Policy) -> None:
    sids = tiny_policy.catalog.sids[:3]
    ids = tiny_policy.prompt.encode(tiny_policy.tokenizer, sids)
    assert tiny_policy.tokenizer.convert_ids_to_tokens(ids) == [t for s in sids for t in s] + ["<sep>"]


def test_codes_far_beyond_any_codebook_are_refused_before_tables_are_sized_by_them() -> None:
    """The tables and each decode step's gather are as wide as the largest code: a catalog whose codes come
    sparse from another quantizer (0, 700000, ...) took minutes and 16 GB before this line."""
    sids = [(0, 0, 0), (0, 1, 700_000), (1, 0, 2_000_000)]
    cat = SidCatalog({i: Item(i, "", tuple(level_token(lv, c) for lv, c in enumerate(s))) for i, s in enumerate(sids)})
    tok = build_sid_tokenizer(cat.vocabulary())
    with pytest.raises(ValueError, match=r"^SID codes run up to 2,000,000 \(level 2, where 3 codes are used\).*"
                       r"at most 65,536; renumber each level's codes 0..n-1 in index.json"):  # fmt: skip
        SidTrie(cat, tok.convert_tokens_to_ids)
    top = [(0, 0, 0), (0, 1, 65_535)]  # the widest that is taken
    cat = SidCatalog({i: Item(i, "", tuple(level_token(lv, c) for lv, c in enumerate(s))) for i, s in enumerate(top)})
    assert SidTrie(cat, build_sid_tokenizer(cat.vocabulary()).convert_tokens_to_ids).codebook_size == 65_536


def tokenizer_without_unk(sid_tokens: list[str]) -> PreTrainedTokenizerFast:
    """A text tokenizer with no unknown token (as Qwen's), the SID tokens added: it answers None for others."""
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={"x": 0}, merges=[])))
    add_sid_tokens(tok, sid_tokens)
    return tok


@pytest.mark.parametrize("unk", [True, False])
def test_a_sid_token_the_tokenizer_lacks_is_refused(tiny_policy: Policy, unk: bool) -> None:
    """``convert_tokens_to_ids`` answers <unk>'s id for a token it lacks: a catalog holding a code its
    tokenizer never had (another checkpoint's catalog.json) built a trie that decoded that code as <unk>,
    silently. Without an <unk> it answered None, and the policy failed an assert."""
    catalog = tiny_policy.catalog
    assert "<c_9>" not in catalog.vocabulary()
    items = dict(catalog.items) | {999: Item(999, "", ("<a_0>", "<b_0>", "<c_9>"))}
    tok = tiny_policy.tokenizer if unk else tokenizer_without_unk(catalog.vocabulary())
    with pytest.raises(ValueError, match=r"^SID token <c_9> is not in the tokenizer's vocabulary"):
        Policy(tiny_policy.model, tok, SidCatalog(items), tiny_policy.prompt)
    assert Policy(tiny_policy.model, tok, catalog, tiny_policy.prompt).trie.num_sids == len(catalog.sids)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5).flatmap(lambda d: st.lists(st.tuples(*[st.integers(0, 3)] * d), min_size=1, max_size=40)))
def test_masks_of_every_depth_match_a_set_of_prefixes(codes: list[tuple[int, ...]]) -> None:
    """The tensors a decoder reads (the level's columns, each node's mask row and children) against the set of
    SID prefixes, at depths 1 to 5."""
    depth = len(codes[0])
    items = {i: Item(i, "", tuple(level_token(lv, c) for lv, c in enumerate(s))) for i, s in enumerate(codes)}
    cat = SidCatalog(items, depth=depth)
    tok = build_sid_tokenizer(cat.vocabulary())
    trie = SidTrie(cat, tok.convert_tokens_to_ids)
    distinct = sorted(set(codes))
    for level in range(depth):
        for prefix in {s[:level] for s in distinct}:
            node = trie.node_of_token_ids(
                tok.convert_tokens_to_ids([level_token(lv, c) for lv, c in enumerate(prefix)])
            )
            nodes = torch.tensor([node])
            want = {s[level] for s in distinct if s[:level] == prefix}
            allowed = torch.nonzero(trie.mask_rows(nodes)[0] == 0).flatten().tolist()
            assert set(allowed) == want and int(trie.node_depth[node]) == level
            assert torch.isinf(trie.mask_rows(nodes)[0]).sum() == trie.codebook_size - len(want)
            tokens = tok.convert_ids_to_tokens(trie.level_token_ids[level, allowed].tolist())
            assert tokens == [level_token(level, c) for c in allowed]  # the columns a decoder gathers
            kids = trie.child_node(nodes.expand(len(allowed)), torch.tensor(allowed, dtype=torch.long))
            assert [int(trie.parent[k]) for k in kids] == [node] * len(allowed)
    for index, sid in enumerate(cat.sids):
        leaf = trie.node_of_token_ids(tok.convert_tokens_to_ids(list(sid)))
        assert int(trie.sid_node[index]) == leaf and int(trie.leaf_sid[leaf]) == index
        assert bool(torch.isinf(trie.mask_rows(torch.tensor([leaf]))).all())  # a leaf has no child


@settings(max_examples=40, deadline=None)
@given(sid_lists, st.data())
def test_a_trie_that_keeps_some_sids_is_the_trie_of_those_sids(
    codes: list[tuple[int, int, int]], data: st.DataObject
) -> None:
    """A service's offered SIDs (``keep``): the same prefixes, children, masks, counts and parents as a trie built
    from those SIDs alone, its leaves naming the whole catalog's SID indices, its tables the whole catalog's
    width; every SID kept is the plain trie, tensor for tensor."""
    items = {i: Item(i, "", tuple(level_token(lv, c) for lv, c in enumerate(sid))) for i, sid in enumerate(codes)}
    cat = SidCatalog(items)
    tok = build_sid_tokenizer(cat.vocabulary())
    keep = sorted(data.draw(st.sets(st.sampled_from(range(len(cat.sids))), min_size=1)))
    trie = SidTrie(cat, tok.convert_tokens_to_ids, keep)
    kept = SidCatalog({i: it for i, it in items.items() if cat.sid_index[it.sid] in keep})
    alone = SidTrie(kept, tok.convert_tokens_to_ids)
    assert trie.num_sids == len(keep) and trie.level_sizes == alone.level_sizes
    assert trie.codebook_size == SidTrie(cat, tok.convert_tokens_to_ids).codebook_size >= alone.codebook_size
    for sid in cat.sids:
        ids = tok.convert_tokens_to_ids(list(sid))
        for depth in range(4):
            assert trie.allowed_token_ids(ids[:depth]) == alone.allowed_token_ids(ids[:depth])
        node = trie.node_of_token_ids(ids)
        index = cat.sid_index[sid]
        assert int(trie.sid_node[index]) == node and (node >= 0) == (index in keep)
        if node >= 0:
            assert int(trie.leaf_sid[node]) == index and int(trie.leaf_counts()[0]) == len(keep)
    every = torch.arange(-1, trie.num_nodes)
    assert torch.equal(trie.mask_rows(every) == 0, trie.child_nodes(every) >= 0)
    whole, all_kept = (
        SidTrie(cat, tok.convert_tokens_to_ids),
        SidTrie(cat, tok.convert_tokens_to_ids, range(len(cat.sids))),
    )
    for name in ("_children", "_mask_bias", "leaf_sid", "sid_node", "parent", "node_depth", "level_token_ids"):
        assert torch.equal(getattr(whole, name), getattr(all_kept, name)), name


def test_a_trie_keeps_at_least_one_sid_of_the_catalog(tiny_policy: Policy) -> None:
    with pytest.raises(ValueError, match="at least one SID"):
        SidTrie(tiny_policy.catalog, tiny_policy.token_id, [])
    with pytest.raises(ValueError, match="outside the catalog's 0.."):
        SidTrie(tiny_policy.catalog, tiny_policy.token_id, [len(tiny_policy.catalog.sids)])
