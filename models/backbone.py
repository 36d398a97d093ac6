"""The calls into the Hugging Face backbone that every decoder makes: prefill and one cached step.

Beam search, VED, the decode benchmark and the RL losses all drive the causal
LM the same way: left-padded prompts with HF generate's position ids, a
``DynamicCache`` passed under whichever keyword the installed transformers
names it (``cache_kwargs``), and only the last position's logits kept.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel


@dataclass
class Prefill:
    """Result of running the prompts once: last-position logits and the cache."""

    logits: torch.Tensor  # (B, V) at the last prompt position
    cache: DynamicCache
    attention_mask: torch.Tensor  # (B, T)
    next_position: torch.Tensor  # (B,) position id of the first generated token
    hidden: torch.Tensor | None = None  # (B, T, H) final-layer states of every prompt position (want_hidden)


_CACHE_KEYWORDS: dict[type, str] = {}  # per model class


def _cache_keyword(model_class: type[nn.Module]) -> str:
    if model_class not in _CACHE_KEYWORDS:
        params = inspect.signature(model_class.forward).parameters
        _CACHE_KEYWORDS[model_class] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KEYWORDS[model_class]


def cache_kwargs(model: PreTrainedModel, cache: DynamicCache) -> dict[str, DynamicCache]:
    """``{name: cache}`` for ``model.forward``: transformers renamed ``past_key_values`` to ``cache`` in 5.2x.

    A wrong name is not an error there (it lands in ``**kwargs`` and the model
    silently runs without the cache), so the name is read off the signature.
    """
    return {_cache_keyword(type(model)): cache}


def layer_kv(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of one full-attention layer of a ``DynamicCache`` (B, kv heads, T, head dim); the
    cache's own typing also admits linear-attention layers, which these backbones do not have."""
    return layer.keys, layer.values


def prompt_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """HF generate's position ids for left-padded prompts."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


@torch.inference_mode()
def prefill(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, want_hidden: bool = False
) -> Prefill:
    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=prompt_position_ids(attention_mask),
        **cache_kwargs(model, cache),
        use_cache=True,
        logits_to_keep=1,
        output_hidden_states=want_hidden,
    )
    logits = out.logits[:, -1, :]
    hidden = out.hidden_states[-1] if want_hidden else None
    next_pos = attention_mask.long().sum(-1)
    return Prefill(logits, cache, attention_mask, next_pos, hidden)


@torch.inference_mode()
def decode_step(
    model: PreTrainedModel,
    cache: DynamicCache,
    token_ids: torch.Tensor,  # (N,) the token appended to each row
    attention_mask: torch.Tensor,  # (N, T) mask including the new token
    position_ids: torch.Tensor,  # (N,)
    want_hidden: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One cached step; returns the logits (N, V) and optionally the last hidden state (N, H)."""
    out = model(
        input_ids=token_ids[:, None],
        attention_mask=attention_mask,
        position_ids=position_ids[:, None],
        **cache_kwargs(model, cache),
        use_cache=True,
        output_hidden_states=want_hidden,
    )
    return out.logits[:, -1, :], (out.hidden_states[-1][:, -1, :] if want_hidden else None)
