"""Which complete SIDs VED returns, and in what order.

The search leaves a pool of complete SIDs (every SID under an evaluated prefix
of depth D - 1) with their path log-probs; ``rank_candidates`` picks G of them:

* the first G - ``explore_slots`` by score, best first;
* then each exploratory slot takes the best-scored SID left whose first-level
  code is not among the chosen ones yet (the best left at all when every
  remaining code is covered), so the tail of the list spreads over prefixes
  the head did not reach.

``models.ved`` scores a SID by its path log-prob plus ``value_weight`` times
the value of its parent prefix, standardised within the tree.
"""

from __future__ import annotations

import torch


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
