"""Rollouts of the RL stage: prompts -> candidate sets C(x) -> training sequences.

A candidate source is a callable over left-padded prompts (and the samples
they were written from) that returns the ranked SIDs per prompt and the tokens
it decoded per prompt. Two sources:

* ``beam_source``: constrained beam search of width G (MiniOneRec's GRPO).
  Budget accounting follows VED's rule (tokens decoded by the backbone, the
  prompt's prefill excluded): the first level comes from the prefill and the
  last level's tokens are never fed back, and a level's beams hold at most the
  catalog's prefixes of that level (the rest are empty slots, as in
  ``models.ved_config.initial_beam_stats``), so beam search of width G spends
  G * (depth - 1) where every prefix level has at least G prefixes, less on a
  catalog with fewer. Given a budget (``vstar diagnose --budget``, not RL), it
  runs the widest beam whose tokens, so counted, fit the budget, and keeps its
  G best: on a catalog with few prefixes at a level that is wider than
  budget // (depth - 1), which would spend less than VED at the same budget.
  With ``fusion`` it is the served decoder, fused with transition counts that
  include the rollout rows; each row's own transition is left out of them
  (``models.transition``), so its target is not handed to the search.
* ``ved_source``: value-guided efficient decoding (``models.ved``) with a frozen
  value head; its own per-prompt statistics report what it spent.

The training sequences are each prompt (left-padded as in decoding, so
positions match the rollout) followed by one candidate's SID tokens; invalid
slots (a prompt with fewer than G valid SIDs) are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch

from models.backbone import prompt_position_ids
from models.beam_search import BeamSearchConfig, DecodeResult, beam_search
from models.node_bonus import NodeBonus
from models.policy import Policy
from models.sid_trie import SidTrie
from models.transition import ShallowFusion
from models.value_head import ValueHead
from models.ved import ved_search
from models.ved_config import VEDConfig
from training.data.dataset import Sample

CandidateSource = Callable[[Policy, torch.Tensor, torch.Tensor, Sequence[Sample]], "Candidates"]


@dataclass
class Candidates:
    decode: DecodeResult
    tokens_spent: list[int]  # (B,) tokens decoded per prompt, prefill excluded


@dataclass
class Rollout:
    """One step's prompts, candidate sets and targets."""

    prompt_ids: torch.Tensor  # (B, T) left-padded
    prompt_mask: torch.Tensor  # (B, T)
    sid_index: torch.Tensor  # (B, G) catalog SID index, -1 where no valid SID
    token_ids: torch.Tensor  # (B, G, D) vocabulary ids
    target_sid: list[int]  # (B,)
    target_item: list[int]  # (B,)
    target_tokens: torch.Tensor  # (B, D) vocabulary ids of the target SID
    tokens_spent: list[int]  # (B,)

    @property
    def valid(self) -> torch.Tensor:
        return self.sid_index >= 0  # (B, G)

    def candidates(self, b: int) -> list[int]:
        """Valid SID indices of prompt ``b`` in rank order."""
        return [s for s in self.sid_index[b].tolist() if s >= 0]

    def paths(self, b: int) -> list[tuple[int, ...]]:
        """Token paths of prompt ``b``'s valid candidates, same order as ``candidates``."""
        keep = self.valid[b]
        return [tuple(t) for t in self.token_ids[b][keep].tolist()]


def beam_tokens(num_beams: int, trie: SidTrie) -> int:
    """Tokens constrained beam search feeds the backbone per prompt, prefill excluded: at each prefix level
    the beams that hold a prefix, at most the level's prefixes in the catalog (VED's accounting of the same
    search, ``models.ved_config.initial_beam_stats``). A slot no prefix fills is padding, not a token: on a
    catalog of 6 first-level codes, width 16 feeds 6 + 16 tokens for SIDs of three, not 2 x 16."""
    return sum(min(num_beams, n) for n in trie.level_sizes[1 : trie.depth])


def equal_budget_beam_width(budget: int, trie: SidTrie) -> int:
    """The widest beam whose tokens, counted as ``beam_tokens`` counts them, fit a per-prompt ``budget``: the
    width that compares beam search with VED at equal cost. At most the catalog's SIDs (beam search holds no
    more); 0 when not one beam fits.

    ``budget // (depth - 1)`` is this width only where every prefix level has that many prefixes: on a catalog
    of 6 first-level codes and 30 second-level ones, 30 tokens pay for width 24 (6 + 24), not 15 (which feeds
    6 + 15 = 21, short of the budget).
    """
    lo, hi = 0, trie.num_sids  # beam_tokens does not fall as the width grows: the widest that fits, by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if beam_tokens(mid, trie) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def beam_source(
    num_candidates: int,
    budget: int | None = None,
    fusion: ShallowFusion | None = None,
    counted: Collection[Sample] | None = None,
) -> CandidateSource:
    """Beam search of width G; with a token ``budget``, the widest beam whose tokens fit it
    (``equal_budget_beam_width``), keeping its G best.

    The budgeted form compares beam search with VED at equal cost (``vstar diagnose --budget``; RL's
    rollouts never take one). ``fusion``: fused with counts that include the samples' own rows (each row's
    transition to its target is left out); ``counted``: the rows the counts hold, when not every sample is
    one of them (``fusion_bonus``).
    """

    def run(policy: Policy, ids: torch.Tensor, mask: torch.Tensor, samples: Sequence[Sample]) -> Candidates:
        least = beam_tokens(num_candidates, policy.trie)
        if budget is not None and budget < least:  # width G could not spend less
            raise ValueError(f"budget {budget} is below what beam search of width G = {num_candidates} feeds: {least}")
        width = num_candidates if budget is None else max(equal_budget_beam_width(budget, policy.trie), num_candidates)
        bonus = fusion_bonus(policy, samples, fusion, counted)
        decode = beam_search(policy.model, policy.trie, ids, mask, BeamSearchConfig(width), bonus)
        if width > num_candidates:
            decode = DecodeResult(*(t[:, :num_candidates] for t in (decode.sid_index, decode.scores, decode.token_ids)))
        return Candidates(decode, [beam_tokens(width, policy.trie)] * ids.shape[0])

    return run


def fusion_bonus(
    policy: Policy,
    samples: Sequence[Sample],
    fusion: ShallowFusion | None,
    counted: Collection[Sample] | None = None,
) -> NodeBonus | None:
    """(B, trie nodes) bonus of ``fusion``, each counted row's own transition left out: every sample's when
    ``counted`` is None (RL's rollouts, on the rows the counts were fit on), else those of the samples in
    ``counted`` (``vstar diagnose`` on rows the counts may or may not hold)."""
    if fusion is None:
        return None
    histories = [s.history for s in samples]
    leave_out = [s.target if counted is None or s in counted else None for s in samples]
    return fusion.node_bonus(histories, policy.catalog, policy.trie, leave_out)


def ved_source(
    value_head: ValueHead,
    config: VEDConfig,
    fusion: ShallowFusion | None = None,
    counted: Collection[Sample] | None = None,
) -> CandidateSource:
    """VED with ``value_head`` frozen (eval mode, no grad) while it decodes; ``fusion`` and ``counted`` as
    ``beam_source``'s."""

    def run(policy: Policy, ids: torch.Tensor, mask: torch.Tensor, samples: Sequence[Sample]) -> Candidates:
        was_training = value_head.training
        value_head.eval()
        bonus = fusion_bonus(policy, samples, fusion, counted)
        try:
            with torch.no_grad():
                result = ved_search(policy.model, value_head, policy.trie, ids, mask, config, bonus)
        finally:
            value_head.train(was_training)
        return Candidates(result.decode, [int(s.tokens_spent) for s in result.stats])

    return run


def collect(policy: Policy, samples: Sequence[Sample], source: CandidateSource) -> Rollout:
    """Decode a candidate set per sample with the policy in eval mode."""
    catalog = policy.catalog
    ids, mask = policy.encode_prompts([[catalog.sid_of(i) for i in s.history] for s in samples])
    was_training = policy.model.training
    policy.model.eval()
    try:
        cand = source(policy, ids, mask, samples)
    finally:
        policy.model.train(was_training)
    target_sids = [catalog.sid_of(s.target) for s in samples]
    target_tokens = torch.tensor([policy.tokenizer.convert_tokens_to_ids(list(sid)) for sid in target_sids])  # (B, D)
    return Rollout(
        ids,
        mask,
        cand.decode.sid_index,
        cand.decode.token_ids,
        [catalog.sid_index[sid] for sid in target_sids],
        [s.target for s in samples],
        target_tokens,
        cand.tokens_spent,
    )


@dataclass
class SequenceBatch:
    """Prompt + candidate sequences of the valid candidates, flattened."""

    input_ids: torch.Tensor  # (N, T+D)
    attention_mask: torch.Tensor  # (N, T+D)
    position_ids: torch.Tensor  # (N, T+D)
    row: torch.Tensor  # (N,) prompt index b
    col: torch.Tensor  # (N,) candidate slot g
    depth: int

    @property
    def prompt_width(self) -> int:
        return int(self.input_ids.shape[1]) - self.depth


def sequences(rollout: Rollout) -> SequenceBatch:
    b, g, d = rollout.token_ids.shape
    row, col = torch.nonzero(rollout.valid, as_tuple=True)  # (N,), (N,)
    prompt = rollout.prompt_ids[row]  # (N, T)
    ids = torch.cat([prompt, rollout.token_ids[row, col]], dim=1)  # (N, T+D)
    mask = torch.cat([rollout.prompt_mask[row], rollout.prompt_mask.new_ones(len(row), d)], dim=1)  # (N, T+D)
    return SequenceBatch(ids, mask, prompt_position_ids(mask), row, col, d)
