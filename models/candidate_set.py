"""Which complete SIDs VED returns, and in what order.

The search leaves a pool of complete SIDs (every SID under an evaluated prefix
of depth D - 1) with their path log-probs; ``rank_candidates`` picks G of them:

* the first G - ``explore_slots`` by score, best first;
* then each exploratory slot takes the best-scored SID left whose first-level
  code is not among the chosen ones yet (the best left at all when every
  remaining code is covered), so the tail of the list spreads over prefixes
  the head did not reach.

``returned_set`` scores each SID of a finished search's pool (``models.ved``)
by its path log-prob plus ``value_weight`` times the value of its parent
prefix, standardised within the tree (plus its shallow-fusion bonus when
fused), ranks them so, and gathers the chosen SIDs' tokens and their paths'
values, entropies and visits into a ``VEDResult``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.beam_search import DecodeResult
from models.node_bonus import NodeBonus
from models.search_tree import SearchTree, standardise_by_depth
from models.sid_trie import SidTrie
from models.ved_config import VEDConfig, VEDStats


def rank_candidates(score: torch.Tensor, first_code: torch.Tensor, g: int, explore_slots: int) -> torch.Tensor:
    """Indices of the chosen candidates, best first: score, first_code (B, K) -> (B, g), -1 past the pool.

    ``score`` is -inf where a slot holds no candidate. Ties go to the lower index.
    """
    if explore_slots > g:
        raise ValueError(f"explore_slots ({explore_slots}) must be <= the candidates returned ({g})")
    # Only finite scores can be chosen, and VED's pool is a few hundred of its (B, M x C) slots: rank those
    # alone, packed in index order (a stable sort keeps ties by index, as over every slot), then map back.
    finite = torch.isfinite(score)  # (B, K)
    rows, cols = torch.nonzero(finite, as_tuple=True)  # row-major: each row's finite slots in index order
    packed = finite.long().cumsum(1)[rows, cols] - 1  # each one's place among its row's
    width = int(packed.max()) + 1 if packed.numel() else 1
    at = torch.zeros(score.shape[0], width, dtype=torch.long, device=score.device)  # (B, W) slot of each place
    at[rows, packed] = cols
    held = torch.zeros_like(at, dtype=torch.bool)
    held[rows, packed] = True
    chosen = _rank(torch.where(held, score.gather(1, at), float("-inf")), first_code.gather(1, at), g, explore_slots)
    return torch.where(chosen >= 0, at.gather(1, chosen.clamp(min=0)), -1)


def _rank(score: torch.Tensor, first_code: torch.Tensor, g: int, explore_slots: int) -> torch.Tensor:
    """``rank_candidates`` over every slot (B, K) given."""
    b, k = score.shape
    order = score.sort(dim=1, descending=True, stable=True).indices  # (B, K)
    ok = torch.isfinite(score.gather(1, order))  # (B, K) in score order
    code = first_code.gather(1, order)  # (B, K)
    head = min(g - explore_slots, k)
    taken = torch.zeros_like(ok)
    taken[:, :head] = True
    chosen = [torch.where(ok[:, :head], order[:, :head], -1)]
    covered = torch.zeros(b, int(first_code.max()) + 1, dtype=torch.bool, device=score.device)  # (B, codes)
    covered.scatter_(1, code[:, :head], ok[:, :head])
    ar = torch.arange(b, device=score.device)
    for _ in range(min(g, k) - head):
        free = ok & ~taken  # (B, K)
        new = free & ~covered.gather(1, code)
        pick = torch.where(new.any(1), new.int().argmax(1), free.int().argmax(1))  # (B,) first in score order
        has = free.any(1)
        taken[ar, pick] |= has
        covered[ar, code[ar, pick]] |= has
        chosen.append(torch.where(has, order[ar, pick], -1)[:, None])
    out = torch.cat(chosen, dim=1)
    if out.shape[1] < g:
        out = torch.cat([out, out.new_full((b, g - out.shape[1]), -1)], dim=1)
    return out


@dataclass
class VEDResult:
    """Candidates in the returned order, their paths' statistics, and the trees.

    ``decode.scores`` is each candidate's ranking score (path log-prob plus the
    value term, ``models.candidate_set``); slots beyond the complete SIDs found
    hold sid_index -1, score -inf, token -1. The ``path_*`` tensors run over
    the candidate's prefix states s_0 (the root) .. s_{D-1}: the complete SID
    is never fed to the backbone, so it has no value of its own. ``tree`` is
    the whole search (visits, values, the policy at each node) for diagnostics.
    """

    decode: DecodeResult
    log_probs: torch.Tensor  # (B, G) policy log-prob of each candidate, -inf at empty slots
    path_values: torch.Tensor  # (B, G, D) V(s_0..s_{D-1}) as the frozen head gave them
    path_entropy: torch.Tensor  # (B, G, D) H(s_0..s_{D-1})
    path_visits: torch.Tensor  # (B, G, D) N(s_0..s_{D-1}) at the end of the search
    stats: list[VEDStats]
    tree: SearchTree


def returned_set(
    tree: SearchTree, trie: SidTrie, cfg: VEDConfig, stats: list[VEDStats], bonus: NodeBonus | None = None
) -> VEDResult:
    """``cfg.num_candidates`` complete SIDs per prompt from the finished tree's pool (``rank_candidates``), with
    their paths' statistics; ``bonus``: the complete SID's shallow-fusion bonus, as fused beam search ranks it."""
    c, prefix = trie.codebook_size, tree.max_depth
    log_probs = tree.candidate_log_probs().flatten(1)  # (B, M*C): candidate (node n, code k) at n * C + k
    parent_value = standardise_by_depth(tree.value, tree.depth, tree.live, prefix + 1)  # (B, M)
    score = log_probs + cfg.value_weight * parent_value.repeat_interleave(c, dim=1)  # (B, M*C)
    if bonus is not None:  # the complete SID's bonus, as fused beam search ranks it
        leaves = trie.child_nodes(tree.trie_node).clamp(min=0).flatten(1)  # (B, M*C)
        score = score + bonus.gather(leaves)
    first_code = tree.code.gather(1, tree.path[..., 0].clamp(min=0)).clamp(min=0)  # (B, M)
    chosen = rank_candidates(score, first_code.repeat_interleave(c, dim=1), cfg.num_candidates, cfg.explore_slots)
    valid = chosen >= 0  # (B, G)
    pick = chosen.clamp(min=0)
    node, code = pick // c, pick % c  # (B, G) each
    leaf = trie.child_node(tree.trie_node.gather(1, node), code).clamp(min=0)  # (B, G)
    sid_index = torch.where(valid, trie.leaf_sid[leaf], -1)
    path = tree.path.gather(1, node[..., None].expand(-1, -1, prefix)).clamp(min=0)  # (B, G, D-1)
    tokens = torch.cat(
        [tree.token.gather(1, path.flatten(1)).view_as(path), trie.level_token_ids[prefix, code][..., None]], -1
    )  # (B, G, D)
    tokens = torch.where(valid[..., None], tokens, -1)
    scores = torch.where(valid, score.gather(1, pick), float("-inf"))
    states = torch.cat([torch.zeros_like(path[..., :1]), path], dim=-1)  # (B, G, D) s_0..s_{D-1}

    def along(x: torch.Tensor) -> torch.Tensor:  # (B, M) -> (B, G, D)
        return x.gather(1, states.flatten(1)).view_as(states)

    decode = DecodeResult(sid_index, scores, tokens)
    cand_lp = torch.where(valid, log_probs.gather(1, pick), float("-inf"))
    return VEDResult(decode, cand_lp, along(tree.value), along(tree.entropy), along(tree.visits), stats, tree)
