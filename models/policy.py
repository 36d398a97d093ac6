"""The policy: a Hugging Face causal LM over SID tokens, with its catalog and trie.

``Policy`` bundles what every decoder and trainer needs together: the LM, its
tokenizer, the SID catalog, the trie built against that tokenizer, and the
prompt format. Two ways in:

* ``Policy.from_preset("tiny" | "small", catalog)``: a Qwen2 network built from a
  config with a word-level SID tokenizer; nothing is downloaded.
* ``Policy.from_pretrained_lm(path, catalog)``: a local pretrained checkpoint
  (e.g. Qwen2.5-0.5B); SID tokens are added and the embeddings resized.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from models.pretrained_folder import TOKENIZER_FILES, first_line, has_tokenizer
from models.sid_catalog import Sid, SidCatalog
from models.sid_tokenizer import TEXT_TEMPLATE, PromptFormat, add_sid_tokens, build_sid_tokenizer, prompt_vocabulary
from models.sid_trie import SidTrie
from models.weight_checks import first_non_finite, fit_problem

GENERIC_TOKENIZERS = ("PreTrainedTokenizerFast", "TokenizersBackend")  # the fast class's names (4.x, 5.x)
POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")  # GPT-2's, OPT's and BART's, BERT's and GPT-Neo's


def learned_positions(model: PreTrainedModel) -> int | None:
    """The positions a model's learned absolute position embeddings hold (``max_position_embeddings``), past
    which its embedding lookup fails; None for a model without such a table (rotary positions: Qwen, Llama)."""
    tables = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES
    ]
    limit = getattr(model.config, "max_position_embeddings", None)
    return int(limit) if tables and isinstance(limit, int) else None


@dataclass(frozen=True)
class PresetConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    dropout: float = 0.1  # attention dropout; small data overfits without it

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")


PRESETS: dict[str, PresetConfig] = {
    "tiny": PresetConfig(32, 2, 2, 1, 64, 0.0),
    "small": PresetConfig(256, 4, 4, 2, 768, 0.1),
}


def preset_config(name: str) -> PresetConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def backbone_fit(model: PreTrainedModel, fit: dict[str, Any]) -> dict[str, Any]:
    """A pretrained folder's loading info less the output head's missing weights: a decoder saved without its
    head (``Qwen2Model``) is taken, since next-SID training predicts SID tokens, whose rows of the head are new
    in any case; a tensor of the backbone missing is not (it would train from random values)."""
    head = model.get_output_embeddings()
    prefix = next((f"{name}." for name, module in model.named_modules() if module is head), None)
    missing = [k for k in fit.get("missing_keys", ()) if prefix is None or not k.startswith(prefix)]
    return {**fit, "missing_keys": missing}


def sees_later_tokens(model: PreTrainedModel) -> bool:
    """Whether the first position's logits change with the token after it: a causal LM's never do. Asked of
    the model itself, not of its class's name (a decoder saved without its head, ``Qwen2Model``, is causal; a
    BERT saved as ``BertLMHeadModel`` without ``is_decoder`` is not)."""
    table = model.get_input_embeddings().weight
    assert isinstance(table, torch.Tensor)
    last = table.shape[0] - 1
    ids = torch.tensor([[0, 1], [0, min(2, last)]], device=model.device)
    with torch.no_grad():
        first = model(input_ids=ids).logits[:, 0].float()
    return not torch.allclose(first[0], first[1], rtol=1e-4, atol=1e-5)


class Policy:
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        catalog: SidCatalog,
        prompt: PromptFormat,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.catalog = catalog
        self.prompt = prompt
        self.trie = SidTrie(catalog, self.token_id).to(self.device)

    def token_id(self, token: str) -> int:
        """The vocabulary id of one token; -1 when the vocabulary lacks it. ``convert_tokens_to_ids`` answers the
        unknown token's id for such a token (None without one), which the trie took for the token's own: a
        catalog and a tokenizer that do not match decoded that SID code as ``<unk>``, silently."""
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if not isinstance(token_id, int) or self.tokenizer.convert_ids_to_tokens(token_id) != token:
            return -1
        return token_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def offer_only(self, sids: Sequence[int]) -> None:
        """Decode to these SID indices alone (a service's items still offered): a trie that holds them only."""
        self.trie = self.offered_trie(sids)

    def offered_trie(self, sids: Sequence[int] | None) -> SidTrie:
        """The trie ``offer_only(sids)`` decodes with, built without swapping it in (a service builds the next one
        off its model thread and swaps it there, between decodes)."""
        return SidTrie(self.catalog, self.token_id, sids).to(self.device)

    def to(self, device: torch.device | str) -> Policy:
        self.model.to(device)  # type: ignore[arg-type]  # transformers types .to's wrapper by its first argument
        self.trie.to(device)
        return self

    @classmethod
    def from_preset(
        cls, name: str, catalog: SidCatalog, seed: int = 0, max_history: int = 10, item_tokens: bool = False
    ) -> Policy:
        preset = preset_config(name)
        prompt = PromptFormat(max_history=max_history, item_tokens=item_tokens)
        tokenizer = build_sid_tokenizer(prompt_vocabulary(catalog, item_tokens))
        max_positions = prompt.tokens_per_item(catalog.depth) * max_history + 64
        config = Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=preset.hidden_size,
            num_hidden_layers=preset.num_hidden_layers,
            num_attention_heads=preset.num_attention_heads,
            num_key_value_heads=preset.num_key_value_heads,
            intermediate_size=preset.intermediate_size,
            attention_dropout=preset.dropout,
            max_position_embeddings=max_positions,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
        return cls(model, tokenizer, catalog, prompt)

    @classmethod
    def from_pretrained_lm(
        cls, path: str, catalog: SidCatalog, max_history: int = 10, item_tokens: bool = False
    ) -> Policy:
        """A ``ValueError`` naming the folder when it holds no causal LM that loads (missing or damaged
        weights, an architecture without a causal LM head), no tokenizer (``AutoTokenizer`` would build
        an empty one for some architectures, Qwen2's, which drops the prompt's text and shrinks the
        embeddings to the SID tokens), or a tokenizer with more tokens than the model has embeddings."""
        if not has_tokenizer(Path(path)):
            raise ValueError(
                f"base model {path}: no tokenizer ({', '.join(TOKENIZER_FILES)}); save the model's tokenizer "
                "into the same folder (tokenizer.save_pretrained)"
            )
        try:
            tokenizer = pretrained_tokenizer(Path(path))
            model, fit = cast(  # a (model, loading info) pair with output_loading_info, which its typing omits
                tuple[PreTrainedModel, dict[str, Any]],
                AutoModelForCausalLM.from_pretrained(
                    path, local_files_only=True, dtype=torch.float32, output_loading_info=True
                ),
            )
        except Exception as e:  # transformers and safetensors raise many kinds; each means "not loadable"
            problem = f"cannot load a causal LM and its tokenizer ({first_line(e)})"
            raise ValueError(f"base model {path}: {problem}") from None
        damaged = first_non_finite(model.named_parameters())  # before the check below would misread it
        if damaged is not None:
            raise ValueError(f"base model {path}: {damaged} holds nan or inf")
        if sees_later_tokens(model):  # BERT loads as BertLMHeadModel, a fresh head on bidirectional attention
            raise ValueError(
                f"base model {path}: it is no causal LM: its output at a position changes with the tokens after "
                "it (an encoder, such as BERT), so next-SID training would see the answer; give a decoder-only LM "
                "(e.g. Qwen2.5)"
            )
        misfit = fit_problem(backbone_fit(model, fit), unexpected=False)  # missing: random weights, only logged
        if misfit is not None:
            raise ValueError(f"base model {path}: its weights do not fit its config.json: {misfit}")
        table = model.get_input_embeddings().weight
        assert isinstance(table, torch.Tensor)
        rows, words = table.shape[0], tokenizer.vocab_size  # the vocabulary itself, without added tokens
        if words > rows:  # the resize below would give the tokens past the table fresh rows, silently
            raise ValueError(
                f"base model {path}: the tokenizer's vocabulary has {words} tokens for an embedding table of {rows} "
                f"rows, so its tokens from id {rows} on have no pretrained embedding: is it another model's tokenizer?"
            )
        bos = adds_bos(tokenizer)  # before the SID tokens: the text tokenizer as pretrained
        add_sid_tokens(tokenizer, prompt_vocabulary(catalog, item_tokens))
        model.resize_token_embeddings(len(tokenizer))
        policy = cls(model, tokenizer, catalog, PromptFormat(max_history, TEXT_TEMPLATE, item_tokens, bos=bos))
        limit = learned_positions(model)
        longest = policy.longest_sequence(max_history)
        if limit is not None and longest > limit:  # training's first long row would fail in the embedding lookup
            fits = [h for h in range(1, max_history) if policy.longest_sequence(h) <= limit]
            raise ValueError(
                f"base model {path}: its learned position embeddings hold {limit} positions, and a prompt of "
                f"{max_history} history items with its answer takes {longest} tokens: "
                + (f"give --max-history {fits[-1]} or less" if fits else "not even one item fits")
            )
        return policy

    def longest_sequence(self, items: int) -> int:
        """Tokens of the longest prompt of ``items`` history items, with a SID answer after it."""
        sid = self.catalog.sids[0]
        return len(self.prompt.encode(self.tokenizer, [sid] * items)) + len(sid)

    def encode_prompts(self, histories: Sequence[Sequence[Sid]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and attention mask for a batch of SID histories."""
        rows = self.prompt.encode_batch(self.tokenizer, histories)
        return pad_left(rows, int(self.tokenizer.pad_token_id), self.device)

    def describe(self) -> dict[str, object]:
        return {"config": self.model.config.to_dict(), "prompt": self.prompt.to_dict()}


def pad_left(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    # built as lists, one tensor each: a tensor and two slice writes per row cost ~25 us a row
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids.reshape(len(rows), width).to(device), mask.reshape(len(rows), width).to(device)


def pretrained_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The tokenizer a pretrained LM's folder holds. A ``tokenizer.json`` saved as the generic fast class is loaded
    as it was saved: ``AutoTokenizer`` takes the architecture's class instead for some (Qwen2's, for every Qwen2
    model), which rebuilds it as a byte-level BPE and encodes the text of another kind (word-level, ...) to
    nothing, so the prompt would silently lose its text. Other classes are ``AutoTokenizer``'s choice."""
    config = folder / "tokenizer_config.json"
    declared = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    if declared in GENERIC_TOKENIZERS and (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer starts every text with its beginning-of-text token by default (Llama's does, so its
    model never saw a text without one; Qwen's has no such token)."""
    bos = tokenizer.bos_token_id
    return bos is not None and list(tokenizer("a")["input_ids"][:1]) == [bos]


def preset_dict(name: str) -> dict[str, object]:
    return asdict(preset_config(name))
