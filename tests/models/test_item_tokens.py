"""Whole-SID item tokens in the prompt: the format, decoding that never emits them, the checkpoint round trip."""

from __future__ import annotations

from pathlib import Path

import torch

from models.beam_search import BeamSearchConfig, beam_search
from models.checkpoint import load_checkpoint, save_checkpoint
from models.hf_beam_search import hf_beam_search
from models.policy import Policy
from models.sid_catalog import SidCatalog
from models.sid_tokenizer import PromptFormat, item_token


def test_item_token_names_the_whole_sid() -> None:
    assert item_token(("<a_30>", "<b_191>", "<c_20>")) == "<item_30_191_20>"


def test_prompt_has_four_tokens_per_item(tiny_catalog: SidCatalog) -> None:
    policy = Policy.from_preset("tiny", tiny_catalog, item_tokens=True)
    plain = Policy.from_preset("tiny", tiny_catalog)
    assert len(policy.tokenizer) == len(plain.tokenizer) + len(tiny_catalog.sids)
    sids = [tiny_catalog.sids[3], tiny_catalog.sids[7]]
    ids = policy.prompt.encode(policy.tokenizer, sids)
    tokens = policy.tokenizer.convert_ids_to_tokens(ids)
    assert tokens == [*sids[0], item_token(sids[0]), *sids[1], item_token(sids[1]), "<sep>"]
    assert policy.tokenizer.unk_token_id not in ids
    assert PromptFormat(item_tokens=True).tokens_per_item(3) == 4 and PromptFormat().tokens_per_item(3) == 3


def test_a_preset_has_positions_for_a_full_history_of_deeper_sids() -> None:
    """The position table holds max_history items of the catalog's own depth (it took 3 tokens an item)."""
    from tests.conftest import make_catalog

    for codes, item_tokens, per_item in [((4, 3, 3), False, 3), ((4, 3, 3, 3, 3, 3, 3, 3), True, 9)]:
        catalog = make_catalog(80, codes=codes, seed=1)
        policy = Policy.from_preset("tiny", catalog, max_history=20, item_tokens=item_tokens)
        assert policy.model.config.max_position_embeddings == per_item * 20 + 64


def test_decoding_never_emits_item_tokens_and_matches_hf(tiny_catalog: SidCatalog) -> None:
    policy = Policy.from_preset("tiny", tiny_catalog, seed=2, item_tokens=True)
    policy.model.eval()
    # Make item tokens the most likely next tokens everywhere: the trie must still exclude them.
    head = policy.model.get_output_embeddings().weight
    item_ids = policy.tokenizer.convert_tokens_to_ids([item_token(s) for s in tiny_catalog.sids])
    with torch.no_grad():
        head[item_ids] *= 50
    ids, mask = policy.encode_prompts([[tiny_catalog.sids[1]], tiny_catalog.sids[4:9]])
    ours = beam_search(policy.model, policy.trie, ids, mask, BeamSearchConfig(8))
    ref = hf_beam_search(policy.model, policy.trie, ids, mask, BeamSearchConfig(8))
    assert torch.equal(ours.sid_index, ref.sid_index)
    torch.testing.assert_close(ours.scores, ref.scores)
    assert not set(ours.token_ids.flatten().tolist()) & set(item_ids)
    assert (ours.sid_index >= 0).all()


def test_checkpoint_keeps_the_item_token_format(tiny_catalog: SidCatalog, tmp_path: Path) -> None:
    policy = Policy.from_preset("tiny", tiny_catalog, item_tokens=True)
    loaded = load_checkpoint(save_checkpoint(tmp_path / "ck", policy)).policy
    assert loaded.prompt.item_tokens
    hist = [tiny_catalog.sids[2], tiny_catalog.sids[5]]
    assert loaded.prompt.encode(loaded.tokenizer, hist) == policy.prompt.encode(policy.tokenizer, hist)
