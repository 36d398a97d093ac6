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

from models.sid_catalog import Sid

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "<eos>", "unk_token": "<unk>", "sep_token": "<sep>"}
TEXT_TEMPLATE = "The user bought these items in order: {history}.\nThe next item is: "


def build_sid_tokenizer(sid_tokens: Sequence[str]) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS.values(), *sid_tokens])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern=Regex(r"<[^<>]+>"), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
    tok.padding_side = "left"
    return tok


def add_sid_tokens(tokenizer: PreTrainedTokenizerBase, sid_tokens: Sequence[str]) -> int:
    """Add SID tokens to a pretrained tokenizer; returns how many were new."""
    added = tokenizer.add_tokens(list(sid_tokens))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return int(added)


@dataclass(frozen=True)
class PromptFormat:
    """How a history becomes a prompt.

    ``max_history`` keeps the most recent items (MiniOneRec's windows hold at
    most 10); ``text_template`` is empty for the SID-only tokenizer.
    """

    max_history: int = 10
    text_template: str = ""

    def __post_init__(self) -> None:
        if self.max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {self.max_history}")

    def render(self, history: Sequence[Sid]) -> str:
        recent = history[-self.max_history :]
        if not self.text_template:
            return "".join("".join(sid) for sid in recent) + "<sep>"
        return self.text_template.format(history=", ".join("".join(sid) for sid in recent))

    def encode(self, tokenizer: PreTrainedTokenizerBase, history: Sequence[Sid]) -> list[int]:
        return list(tokenizer(self.render(history), add_special_tokens=False)["input_ids"])

    def to_dict(self) -> dict[str, object]:
        return asdict(self)
