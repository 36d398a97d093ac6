"""The reference decoder: Hugging Face ``generate`` with a trie-backed
``prefix_allowed_tokens_fn``, exactly as the public MiniOneRec code decodes.

It exists to be compared against (tests, ``vstar bench decode``); serving and
training use ``models.beam_search``.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from models.beam_search import BeamSearchConfig, DecodeResult
from models.sid_trie import SidTrie


@torch.inference_mode()
def hf_beam_search(
    model: PreTrainedModel,
    trie: SidTrie,
    input_ids: torch.Tensor,  # (B, T) left-padded
    attention_mask: torch.Tensor,
    config: BeamSearchConfig,
) -> DecodeResult:
    k = config.num_beams
    if k < 2:
        raise ValueError("HF beam search needs num_beams >= 2 (num_beams=1 is greedy search)")
    prompt_len = input_ids.shape[1]

    def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:
        return trie.allowed_token_ids(sent[prompt_len:].tolist())

    out = model.generate(  # type: ignore[operator]  # transformers' typing of generate
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=trie.depth,
        min_new_tokens=trie.depth,
        num_beams=k,
        num_return_sequences=k,
        do_sample=False,
        length_penalty=0.0,
        early_stopping=False,
        prefix_allowed_tokens_fn=allowed,
        return_dict_in_generate=True,
        output_scores=True,
        pad_token_id=model.config.pad_token_id,
        eos_token_id=None,
    )
    b = input_ids.shape[0]
    tokens = out.sequences[:, prompt_len:].reshape(b, k, trie.depth)
    scores = out.sequences_scores.float().reshape(b, k)
    valid = scores > -1e8  # HF fills missing beams with -1e9 continuations
    nodes = torch.tensor(
        [trie.node_of_token_ids(t) for t in tokens.reshape(-1, trie.depth).tolist()], device=tokens.device
    ).reshape(b, k)
    sid_index = torch.where(valid & (nodes >= 0), trie.leaf_sid[nodes.clamp(min=0)], -1)
    return DecodeResult(sid_index, torch.where(valid, scores, float("-inf")), tokens)
