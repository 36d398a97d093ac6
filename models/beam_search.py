"""Exact constrained top-K beam search over valid SIDs.

It returns what Hugging Face ``generate(num_beams=K, num_return_sequences=K,
prefix_allowed_tokens_fn=trie, length_penalty=0)`` returns (same SIDs, same
order, same summed log-probabilities), which is how the public MiniOneRec code
decodes, but does only the work that any such decode needs:

* the prompts are prefilled once, B rows rather than HF's B*K copies, and the
  beams never copy it: they decode as K query positions in their prompt's row
  with a 4D "tree" attention mask (each beam sees the prompt and its own
  ancestors), so there is no per-beam cache expansion and no reorder after
  pruning (the same math as HF's B*K rows; masked keys weigh exactly 0);
* validity comes from the trie's dense child table (``child_nodes``,
  ``mask_rows``): a level's logits are gathered to that level's codebook
  columns, masked and ranked in one ``topk`` over (K x codebook) per prompt,
  with no Python loop over beams or prompts;
* many prompts of different lengths are decoded together (left padding with
  HF's position ids, so scores match HF on the same padded batch).

Scores are float32 log-probabilities under the full-vocabulary softmax, as HF
computes them before its constraint mask. With ``bonus`` (shallow fusion with
a count prior, ``models.transition``), a beam is ranked by its log-probability
plus its node's bonus, and the scores returned include the leaf's bonus.
Prompts with fewer than K valid SIDs get -1 / -inf in the unused slots (HF
would return junk continuations there). Among candidates of exactly equal
score, which survive a level and in what order is ``topk``'s choice, as in HF:
deterministic on one device, but not by SID index, and not necessarily HF's
(under uniform logits the two returned different SIDs of the one score).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from models.backbone import cache_kwargs, prefill
from models.node_bonus import NodeBonus
from models.sid_trie import SidTrie


@dataclass(frozen=True)
class BeamSearchConfig:
    num_beams: int = 10

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")


@dataclass
class DecodeResult:
    """Ranked SIDs per prompt, best first."""

    sid_index: torch.Tensor  # (B, K) catalog SID index, -1 where no valid SID
    scores: torch.Tensor  # (B, K) summed log-probs, -inf where no valid SID
    token_ids: torch.Tensor  # (B, K, depth) vocabulary ids

    def ranked(self) -> list[list[int]]:
        """Per prompt, the valid SID indices in rank order."""
        return [[int(s) for s in row if s >= 0] for row in self.sid_index.tolist()]


def level_log_probs(logits: torch.Tensor, trie: SidTrie, level: int, nodes: torch.Tensor) -> torch.Tensor:
    """Log-probs of each node's children at ``level``, -inf for invalid codes: (N, C).

    ``log_softmax`` over the full vocabulary, exactly as HF computes it before
    its constraint mask (PyTorch's fused kernel is faster here than a separate
    log-sum-exp), then only the level's columns are kept and the mask is one
    row lookup in the trie's additive bias table.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    picked = log_probs.index_select(1, trie.level_columns[level])  # (N, C)
    return picked + trie.mask_rows(nodes)


def tree_mask(prompt_bias: torch.Tensor, ancestors: torch.Tensor, eye_bias: torch.Tensor, neg: float) -> torch.Tensor:
    """Additive 4D mask for one tree-attention step: (B, 1, K, T + L*K) for L = levels fed so far.

    Query j sees the prompt's real positions, its ancestor's slot in each earlier
    level's block of K, and its own slot (the diagonal) in the newest block.
    """
    b, k, done = ancestors.shape
    parts = [prompt_bias[:, None, :].expand(b, k, -1)]
    if done:
        hit = torch.nn.functional.one_hot(ancestors, k).bool()  # (B, K, done, K)
        block = torch.zeros(hit.shape, dtype=eye_bias.dtype, device=eye_bias.device).masked_fill(~hit, neg)
        parts.append(block.flatten(2))
    parts.append(eye_bias.expand(b, k, k))
    return torch.cat(parts, dim=-1)[:, None]


@torch.inference_mode()
def beam_search(
    model: PreTrainedModel,
    trie: SidTrie,
    input_ids: torch.Tensor,  # (B, T) left-padded
    attention_mask: torch.Tensor,  # (B, T)
    config: BeamSearchConfig,
    bonus: NodeBonus | None = None,  # (B, trie nodes) added to a beam's score at each node it reaches
) -> DecodeResult:
    k = config.num_beams
    sids = trie.num_sids
    if k > sids:  # beams beyond the number of SIDs never hold one: search with as many, pad the rest
        return padded(beam_search(model, trie, input_ids, attention_mask, BeamSearchConfig(sids), bonus), k)
    b = input_ids.shape[0]
    c = trie.codebook_size
    dev = input_ids.device
    pre = prefill(model, input_ids, attention_mask)

    root = torch.zeros(b, dtype=torch.long, device=dev)
    cand = level_log_probs(pre.logits, trie, 0, root)  # (B, C)
    if bonus is not None:
        cand = cand + bonus.gather(trie.child_nodes(root).clamp(min=0))
    width = min(k, c)
    scores, codes = cand.topk(width, dim=-1)  # (B, width)
    if width < k:
        scores = torch.cat([scores, scores.new_full((b, k - width), float("-inf"))], dim=1)
        codes = torch.cat([codes, codes.new_zeros((b, k - width))], dim=1)
    nodes = trie.child_node(root[:, None].expand_as(codes), codes).clamp(min=0)  # (B, K)
    tokens = trie.level_token_ids[0, codes].unsqueeze(-1)  # (B, K, levels so far)

    # Tree attention: the K beams of a prompt stay in the prompt's row as K query
    # positions, each attending to the prompt and to its own ancestors only, so
    # the prompt's cache is never copied per beam nor reordered after pruning.
    cache = pre.cache
    t = attention_mask.shape[1]
    neg = torch.finfo(model.dtype).min
    prompt_bias = torch.zeros((b, t), dtype=model.dtype, device=dev).masked_fill(attention_mask == 0, neg)
    eye_bias = torch.full((k, k), neg, dtype=model.dtype, device=dev).fill_diagonal_(0.0)  # (K, K)
    ancestors = torch.zeros((b, k, 0), dtype=torch.long, device=dev)  # slot of each earlier level's token
    for level in range(1, trie.depth):
        mask = tree_mask(prompt_bias, ancestors, eye_bias, neg)  # (B, 1, K, T + level*K)
        position = pre.next_position[:, None].expand(b, k) + level - 1  # (B, K)
        # rows of invalid beams (score -inf) carry token -1: feed any valid id, they stay -inf
        step_ids = tokens[:, :, -1].clamp(min=0)  # (B, K)
        out = model(
            input_ids=step_ids, attention_mask=mask, position_ids=position, **cache_kwargs(model, cache), use_cache=True
        )
        cand = level_log_probs(out.logits.reshape(b * k, -1), trie, level, nodes.reshape(-1))  # (B*K, C)
        if bonus is not None:  # the step from each beam's node to each child: their bonuses' difference
            child = trie.child_nodes(nodes).clamp(min=0).reshape(b, k * c)  # (B, K*C)
            step = bonus.gather(child) - bonus.gather(nodes).repeat_interleave(c, dim=1)
            cand = cand + step.reshape(b * k, c)
        cand = (cand + scores.reshape(-1, 1)).reshape(b, k * c)
        scores, flat = cand.topk(k, dim=-1)  # (B, K)
        parent, codes = flat // c, flat % c
        nodes = trie.child_node(nodes.gather(1, parent), codes).clamp(min=0)
        tokens = torch.cat(
            [
                tokens.gather(1, parent.unsqueeze(-1).expand(-1, -1, level)),
                trie.level_token_ids[level, codes].unsqueeze(-1),
            ],
            dim=-1,
        )
        inherited = ancestors.gather(1, parent.unsqueeze(-1).expand(-1, -1, level - 1))
        ancestors = torch.cat([inherited, parent[..., None]], dim=-1)  # (B, K, level)

    valid = torch.isfinite(scores)
    sid_index = torch.where(valid, trie.leaf_sid[nodes], -1)
    return DecodeResult(sid_index, scores, tokens)


def padded(result: DecodeResult, k: int) -> DecodeResult:
    """``result`` with empty slots (SID -1, score -inf, token -1) up to ``k`` per prompt."""
    b, width, depth = result.token_ids.shape
    extra = k - width
    return DecodeResult(
        torch.cat([result.sid_index, result.sid_index.new_full((b, extra), -1)], dim=1),
        torch.cat([result.scores, result.scores.new_full((b, extra), float("-inf"))], dim=1),
        torch.cat([result.token_ids, result.token_ids.new_full((b, extra, depth), -1)], dim=1),
    )
