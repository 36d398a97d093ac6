"""Tokenizers that know SID tokens, and the prompt format built on them.

Two cases, one interface (a ``PreTrainedTokenizerFast``):

* ``build_sid_tokenizer``: a word-level tokenizer whose vocabulary is the SID
  tokens plus four specials. Nothing is downloaded; used by the presets. The
  prompt is the history as SID tokens followed by ``<sep>``.
* ``add_sid_tokens``: a pretrained text LM's tokenizer (Qwen2.5, ...) with the SID
  tokens added as whole tokens; the prompt wraps the history in a short text
  template, because a text LM reads instructions better than bare ids.

``PromptFormat`` turns SID histories into token ids; it is stored in the
checkpoint manifest so serving formats prompts exactly as training did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from models.sid_catalog import Sid, SidCatalog, code_text

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "<eos>", "unk_token": "<unk>", "sep_token": "<sep>"}
TEXT_TEMPLATE = "The user bought these items in order: {history}.\nThe next item is: "


def item_token(sid: Sid) -> str:
    """The prompt-only token naming one whole SID: ``<a_30><b_191><c_20>`` -> ``<item_30_191_20>``."""
    return "<item_" + "_".join(code_text(tok) for tok in sid) + ">"


def prompt_vocabulary(catalog: SidCatalog, item_tokens: bool) -> list[str]:
    """The SID tokens, level by level, then (with ``item_tokens``) one token per distinct SID."""
    return catalog.vocabulary() + ([item_token(sid) for sid in catalog.sids] if item_tokens else [])


def build_sid_tokenizer(sid_tokens: Sequence[str]) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS.values(), *sid_tokens])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern=Regex(r"<[^<>]+>"), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
    tok.padding_side = "left"
    return tok


def add_sid_tokens(tokenizer: PreTrainedTokenizerBase, sid_tokens: Sequence[str]) -> int:
    """Add SID tokens to a pretrained tokenizer, and a pad token when it has none; returns how many were new."""
    added = tokenizer.add_tokens(list(sid_tokens))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    elif tokenizer.pad_token is None:  # neither: a pad token of its own (the attention mask hides it)
        added += tokenizer.add_special_tokens({"pad_token": SPECIAL_TOKENS["pad_token"]})
    tokenizer.padding_side = "left"
    return int(added)


@dataclass(frozen=True)
class PromptFormat:
    """How a history becomes a prompt.

    ``max_history`` keeps the most recent items (MiniOneRec's windows hold at
    most 10); ``text_template`` is empty for the SID-only tokenizer. With
    ``item_tokens`` every history item is followed by its whole-SID token
    (``item_token``): the three level tokens are shared by many items, so the
    prompt also names the item itself, as an item-ID model would. Those tokens
    only ever appear in prompts; decoders generate level tokens alone. With
    ``bos`` the prompt starts with the tokenizer's beginning-of-text token: a
    pretrained LM whose tokenizer puts one first (Llama's) saw it at the start
    of every text it learnt from (``models.policy.adds_bos``; Qwen's has none).
    """

    max_history: int = 10
    text_template: str = ""
    item_tokens: bool = False
    bos: bool = False

    def __post_init__(self) -> None:
        if self.max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {self.max_history}")

    def tokens_per_item(self, depth: int) -> int:
        """Prompt tokens per history item for SIDs of ``depth`` tokens (one more with ``item_tokens``)."""
        return depth + int(self.item_tokens)

    def render(self, history: Sequence[Sid]) -> str:
        recent = history[-self.max_history :]
        words = ["".join(sid) + (item_token(sid) if self.item_tokens else "") for sid in recent]
        if not self.text_template:
            return "".join(words) + "<sep>"
        return self.text_template.format(history=", ".join(words))

    def encode(self, tokenizer: PreTrainedTokenizerBase, history: Sequence[Sid]) -> list[int]:
        return self.encode_batch(tokenizer, [history])[0]

    def encode_batch(self, tokenizer: PreTrainedTokenizerBase, histories: Sequence[Sequence[Sid]]) -> list[list[int]]:
        """``encode`` of each history, in one call of the tokenizer: a call per prompt cost a 32-prompt beam
        search ~1.9 ms of the tokenizer's Python overhead (of ~25 ms), on the service's one model thread."""
        if not histories:
            return []
        rows = tokenizer([self.render(h) for h in histories], add_special_tokens=False)["input_ids"]
        bos = [int(tokenizer.bos_token_id)] if self.bos else []
        return [bos + list(ids) for ids in rows]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)
