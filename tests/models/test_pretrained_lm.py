"""``--base-model``: a local pretrained causal LM gets the SID tokens, a text prompt, and round-trips.

The "pretrained" LM is a tiny Qwen2 with a word-level text tokenizer, saved to a
folder the way a downloaded checkpoint would be; nothing is fetched.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertLMHeadModel,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Model,
)

from models.beam_search import BeamSearchConfig, beam_search
from models.checkpoint import load_checkpoint, save_checkpoint
from models.policy import Policy
from models.sid_catalog import Sid, SidCatalog
from training.sft.config import SFTConfig
from training.sft.trainer import train_sft


@pytest.fixture(scope="module")
def text_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = ["<unk>", "<eos>", "The", "user", "bought", "these", "items", "in", "order:", "next", "item", "is:"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, max_position_embeddings=128, eos_token_id=1,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("text_lm")
    Qwen2ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_sid_tokens_added_and_prompt_uses_them(text_lm: Path, tiny_catalog: SidCatalog) -> None:
    policy = Policy.from_pretrained_lm(str(text_lm), tiny_catalog)
    vocab = tiny_catalog.vocabulary()
    ids = policy.tokenizer.convert_tokens_to_ids(vocab)
    assert len(set(ids)) == len(vocab) and min(ids) >= 12  # new ids, one per SID token
    assert policy.model.get_input_embeddings().weight.shape[0] >= len(policy.tokenizer)
    history = [tiny_catalog.sids[0], tiny_catalog.sids[5]]
    tokens = policy.tokenizer.convert_ids_to_tokens(policy.prompt.encode(policy.tokenizer, history))
    assert [t for t in tokens if t in set(vocab)] == [*history[0], *history[1]]
    ids, mask = policy.encode_prompts([history])
    res = beam_search(policy.model, policy.trie, ids, mask, BeamSearchConfig(5))
    assert all(0 <= s < len(tiny_catalog.sids) for s in res.sid_index[0].tolist())


def test_prompt_keeps_the_text_of_a_word_level_tokenizer(text_lm: Path, tiny_catalog: SidCatalog) -> None:
    policy = Policy.from_pretrained_lm(str(text_lm), tiny_catalog)  # AutoTokenizer: Qwen2's, which read it as BPE
    tokens = policy.tokenizer.convert_ids_to_tokens(policy.prompt.encode(policy.tokenizer, [tiny_catalog.sids[0]]))
    assert tokens == ["The", "user", "bought", "these", "items", "in", "order:", *tiny_catalog.sids[0], "<unk>"] + [
        "The", "next", "item", "is:",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def llama_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-style folder: its tokenizer puts <s> before every text, as Llama's does."""
    words = ["<unk>", "<s>", "</s>", "The", "user", "bought", "these", "items", "in", "order:", "next", "item", "is:"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("llama_lm")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_prompt_starts_with_bos_where_the_pretrained_tokenizer_puts_one(
    llama_lm: Path, text_lm: Path, tiny_catalog: SidCatalog, tmp_path: Path
) -> None:
    """A Llama-style model saw <s> first in every text it learnt from: its prompts start so too, in training and
    decoding alike (one encoder), and a saved checkpoint keeps it; a tokenizer without one (Qwen's) is unchanged."""
    history = [tiny_catalog.sids[0]]
    policy = Policy.from_pretrained_lm(str(llama_lm), tiny_catalog)
    tokens = policy.tokenizer.convert_ids_to_tokens(policy.prompt.encode(policy.tokenizer, history))
    assert tokens[:4] == ["<s>", "The", "user", "bought"] and tokens.count("<s>") == 1
    ids, _ = policy.encode_prompts([history])
    assert ids[0, 0].item() == policy.tokenizer.bos_token_id
    loaded = load_checkpoint(save_checkpoint(tmp_path / "ck", policy)).policy
    assert loaded.prompt.bos and loaded.prompt.encode(loaded.tokenizer, history) == policy.prompt.encode(
        policy.tokenizer, history
    )
    plain = Policy.from_pretrained_lm(str(text_lm), tiny_catalog)
    assert not plain.prompt.bos and plain.prompt.encode(plain.tokenizer, history)[0] != plain.tokenizer.bos_token_id


def test_checkpoint_round_trip_and_sft(text_lm: Path, tiny_dataset, tmp_path: Path) -> None:
    policy = Policy.from_pretrained_lm(str(text_lm), tiny_dataset.catalog)
    loaded = load_checkpoint(save_checkpoint(tmp_path / "ck", policy)).policy
    history = [[tiny_dataset.catalog.sids[1]]]
    a = beam_search(policy.model, policy.trie, *policy.encode_prompts(history), BeamSearchConfig(4))
    b = beam_search(loaded.model, loaded.trie, *loaded.encode_prompts(history), BeamSearchConfig(4))
    assert torch.equal(a.sid_index, b.sid_index)
    config = SFTConfig(base_model=str(text_lm), max_steps=2, batch_size=8, lr=1e-3, eval_limit=8)
    summary = train_sft(tiny_dataset, tmp_path / "sft", config, progress=False)
    assert summary["steps"] == 2
    assert load_checkpoint(tmp_path / "sft").policy.prompt.text_template


@pytest.mark.parametrize("damage", ["no weights", "truncated weights"])
def test_unloadable_base_model_is_one_value_error(
    text_lm: Path, tiny_catalog: SidCatalog, tmp_path: Path, damage: str
) -> None:
    folder = tmp_path / "lm"
    shutil.copytree(text_lm, folder)
    weights = folder / "model.safetensors"
    if damage == "no weights":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"base model {folder}: cannot load a causal LM"):
        Policy.from_pretrained_lm(str(folder), tiny_catalog)


@pytest.mark.parametrize(
    ("damage", "message"),
    [  # trained on random values with exit status 0; blamed on the learning rate, or read as an encoder
        ("a layer missing", r"its weights do not fit its config.json: model.layers.0.mlp.down_proj.weight is missing"),
        ("nan", r"model.layers.0.mlp.down_proj.weight holds nan or inf"),
    ],
)
def test_a_base_model_whose_weights_are_missing_or_not_finite_is_refused(
    text_lm: Path, tiny_catalog: SidCatalog, tmp_path: Path, damage: str, message: str
) -> None:
    folder = tmp_path / "lm"
    shutil.copytree(text_lm, folder)
    weights = load_file(folder / "model.safetensors")
    if damage == "a layer missing":
        del weights["model.layers.0.mlp.down_proj.weight"]
    else:
        weights["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"base model {folder}: {message}"):
        Policy.from_pretrained_lm(str(folder), tiny_catalog)


def test_base_model_without_tokenizer_is_refused(text_lm: Path, tiny_catalog: SidCatalog, tmp_path: Path) -> None:
    folder = tmp_path / "lm"
    shutil.copytree(text_lm, folder, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(ValueError, match=f"base model {folder}: no tokenizer"):  # Qwen2's would be empty
        Policy.from_pretrained_lm(str(folder), tiny_catalog)


def test_a_base_model_that_does_not_load_loses_no_earlier_run(text_lm: Path, tiny_dataset, tmp_path: Path) -> None:
    """A fresh run (what --force starts) builds its model before it clears an earlier run's side files: a
    pretrained folder that does not load stops it with that run's resume state and curves in place."""
    folder, out = tmp_path / "lm", tmp_path / "sft"
    shutil.copytree(text_lm, folder, ignore=shutil.ignore_patterns("tokenizer*"))
    earlier = [tmp_path / "sft.resume" / "trainer_state.pt", tmp_path / "sft.tb" / "events"]
    for f in earlier:
        f.parent.mkdir()
        f.write_text("an earlier run's")
    config = SFTConfig(base_model=str(folder), max_steps=2, batch_size=8, eval_limit=8)
    with pytest.raises(ValueError, match="no tokenizer"):
        train_sft(tiny_dataset, out, config, progress=False)
    assert all(f.read_text() == "an earlier run's" for f in earlier)


def gpt2_lm(text_lm: Path, folder: Path, positions: int) -> Path:
    """A tiny GPT-2 (learned absolute positions: its ``wpe`` table) with ``text_lm``'s tokenizer."""
    shutil.copytree(text_lm, folder, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    config = GPT2Config(vocab_size=12, n_embd=32, n_layer=1, n_head=2, n_positions=positions, eos_token_id=1)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def test_a_base_model_whose_learned_positions_are_too_few_for_the_prompts_is_refused(
    text_lm: Path, tiny_dataset, tmp_path: Path
) -> None:
    """GPT-2's positions are a table: a prompt past it failed at the first long row, mid-training, with an
    IndexError traceback (a device-side assert on CUDA), after an earlier run's side files were cleared."""
    catalog = tiny_dataset.catalog
    roomy = Policy.from_pretrained_lm(str(gpt2_lm(text_lm, tmp_path / "roomy", 512)), catalog)
    longest = roomy.longest_sequence(10)  # the text template, 10 SIDs and the answer's
    fits = max(h for h in range(1, 10) if roomy.longest_sequence(h) <= longest - 4)
    folder = gpt2_lm(text_lm, tmp_path / "short", longest - 4)
    message = (
        f"base model {folder}: its learned position embeddings hold {longest - 4} positions, and a prompt of 10 "
        f"history items with its answer takes {longest} tokens: give --max-history {fits} or less"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        Policy.from_pretrained_lm(str(folder), catalog)
    assert Policy.from_pretrained_lm(str(folder), catalog, max_history=fits).longest_sequence(fits) <= longest - 4
    earlier = tmp_path / "sft.resume" / "trainer_state.pt"
    earlier.parent.mkdir()
    earlier.write_text("an earlier run's")
    with pytest.raises(ValueError, match="learned position embeddings hold"):
        train_sft(
            tiny_dataset, tmp_path / "sft", SFTConfig(base_model=str(folder), max_steps=2, batch_size=8), progress=False
        )
    assert earlier.read_text() == "an earlier run's"
    # rotary positions (Qwen2's) have no table: its max_position_embeddings (128) is no bound
    assert Policy.from_pretrained_lm(str(text_lm), catalog, max_history=60).longest_sequence(60) > 128


def test_tokenizer_longer_than_the_embeddings_is_refused(
    text_lm: Path, tiny_catalog: SidCatalog, tmp_path: Path
) -> None:
    folder = tmp_path / "lm"
    shutil.copytree(text_lm, folder)
    config = Qwen2Config.from_pretrained(text_lm)
    config.vocab_size = 8  # the tokenizer has 12 tokens: ids 8..11 would get fresh rows
    Qwen2ForCausalLM(config).save_pretrained(folder)
    with pytest.raises(ValueError, match="the tokenizer.s vocabulary has 12 tokens for an embedding table of 8 rows"):
        Policy.from_pretrained_lm(str(folder), tiny_catalog)


@pytest.mark.parametrize("cls", [BertModel, BertForMaskedLM, BertLMHeadModel])
def test_an_encoder_is_refused(cls: type, text_lm: Path, tiny_catalog: SidCatalog, tmp_path: Path) -> None:
    """transformers loads a BERT folder as BertLMHeadModel (a fresh head, attention to later tokens), and it
    trained: next-SID training that sees the answer. Refused by what the model does, whatever its class's name
    (BertLMHeadModel without is_decoder attends to later tokens too)."""
    folder = tmp_path / "bert"
    shutil.copytree(text_lm, folder, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    config = BertConfig(vocab_size=12, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    cls(config).save_pretrained(folder)
    with pytest.raises(ValueError, match=r"it is no causal LM: its output at a position changes with the tokens after"):
        Policy.from_pretrained_lm(str(folder), tiny_catalog)


def test_a_decoder_saved_without_its_head_is_taken(text_lm: Path, tiny_catalog: SidCatalog, tmp_path: Path) -> None:
    """Qwen2Model (no LM head; the embeddings tie it) is causal: taken, as its *ForCausalLM would be."""
    folder = tmp_path / "qwen_base"
    shutil.copytree(text_lm, folder, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    Qwen2Model(Qwen2Config.from_pretrained(text_lm)).save_pretrained(folder)
    policy = Policy.from_pretrained_lm(str(folder), tiny_catalog)
    assert policy.model.config.model_type == "qwen2"


def test_tokenizer_without_pad_or_eos_gets_a_pad_token(tiny_catalog: SidCatalog, tmp_path: Path) -> None:
    words = ["<unk>", "The", "user", "bought", "these", "items", "in", "order:", "next", "item", "is:"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tmp_path / "lm"  # a Llama: AutoTokenizer adds no end-of-text token of its own, as it does for Qwen2
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>").save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, max_position_embeddings=128,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    policy = Policy.from_pretrained_lm(str(folder), tiny_catalog)
    pad = policy.tokenizer.pad_token_id
    assert pad is not None and pad < policy.model.get_input_embeddings().weight.shape[0]
    ids, mask = policy.encode_prompts([[tiny_catalog.sids[0]], tiny_catalog.sids[:3]])
    assert ids[0, 0] == pad and mask[0, 0] == 0
    assert load_checkpoint(save_checkpoint(tmp_path / "ck", policy)).policy.tokenizer.pad_token_id == pad


def reference_prompts(policy: Policy, histories: Sequence[Sequence[Sid]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain way: one tokenizer call per prompt, then each row written into a padded table."""
    bos = [policy.tokenizer.bos_token_id] if policy.prompt.bos else []
    render = policy.prompt.render
    rows = [bos + list(policy.tokenizer(render(h), add_special_tokens=False)["input_ids"]) for h in histories]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(policy.tokenizer.pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


@pytest.mark.parametrize("kind", ["preset", "preset_item_tokens", "text", "llama_bos"])
def test_a_batch_of_prompts_is_encoded_as_each_alone(
    kind: str, text_lm: Path, llama_lm: Path, tiny_catalog: SidCatalog
) -> None:
    """``encode_prompts`` tokenizes the batch in one call and pads it in one go: the same ids and mask as a call
    per prompt, for the SID-only prompt (with and without item tokens) and the text templates (with a BOS)."""
    policy = {
        "preset": lambda: Policy.from_preset("tiny", tiny_catalog),
        "preset_item_tokens": lambda: Policy.from_preset("tiny", tiny_catalog, item_tokens=True),
        "text": lambda: Policy.from_pretrained_lm(str(text_lm), tiny_catalog),
        "llama_bos": lambda: Policy.from_pretrained_lm(str(llama_lm), tiny_catalog),
    }[kind]()
    sids = tiny_catalog.sids
    histories = [[sids[0]], sids[3:15], sids[7:9], [sids[1]] * 3]  # one longer than the prompt's window
    ids, mask = policy.encode_prompts(histories)
    want_ids, want_mask = reference_prompts(policy, histories)
    assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask)
    assert policy.encode_prompts(histories[1:2])[0].tolist() == [policy.prompt.encode(policy.tokenizer, histories[1])]
