"""Candidate-set diagnostics: what a decoder gives GRPO to learn from.

For each prompt of a split, one decoder (beam search or VED) builds the
candidate set C(x) of G SIDs; the standard reward and the group advantage are
computed as in training. Reported means over prompts:

* ``reachability``: share of prompts whose target SID is in C(x);
* ``nonzero_adv_share``: share of groups with a non-zero advantage. With the
  rule + ranking reward every candidate gets the same reward unless the target
  is in C(x), so for G >= 2 this equals ``reachability`` by construction;
* ``reward_std``: within-group reward std (unbiased, as in the advantage);
* ``distinct_l1``: distinct first-level SID tokens in C(x) (prefix diversity);
* ``tokens_per_prompt``: tokens the decoder fed the backbone, prefill excluded.

``--budget B`` with beam search runs the widest beam B pays for and keeps its G
best, so beam and VED can be compared at equal cost.

The trainer logs the same figures every step (``candidate_stats``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from models.checkpoint import LoadedCheckpoint
from models.policy import Policy
from training.data import Sample
from training.rewards import batch_standard_rewards, group_advantages
from training.rollout import CandidateSource, Rollout, beam_source, collect, require_module, ved_source
from training.value_io import load_value_head

DIAGNOSTIC_KEYS = ("reachability", "nonzero_adv_share", "reward_std", "distinct_l1", "tokens_per_prompt")


def candidate_stats(rollout: Rollout, rewards: torch.Tensor, adv: torch.Tensor) -> dict[str, float]:
    """Means over the prompts of one rollout; rewards and adv are (B, G), 0 at invalid slots."""
    valid = rollout.valid.cpu()  # (B, G)
    rows = []
    for b in range(valid.shape[0]):
        keep = valid[b]
        r = rewards[b, keep]
        rows.append(
            (
                float(rollout.target_sid[b] in rollout.candidates(b)),
                float(bool((adv[b, keep].abs() > 0).any())),
                float(r.std()) if r.numel() > 1 else 0.0,
                float(len(set(rollout.candidates(b)))),
                float(len({p[0] for p in rollout.paths(b)})),
                float(rollout.tokens_spent[b]),
                float(r.mean()) if r.numel() else 0.0,
            )
        )
    t = torch.tensor(rows).mean(dim=0).tolist()
    keys = (
        "reachability",
        "nonzero_adv_share",
        "reward_std",
        "distinct",
        "distinct_l1",
        "tokens_per_prompt",
        "reward_mean",
    )
    return dict(zip(keys, t, strict=True))


def diagnose(
    policy: Policy, samples: Sequence[Sample], source: CandidateSource, batch_size: int = 32, progress: bool = True
) -> dict[str, float]:
    """The ``DIAGNOSTIC_KEYS`` of ``source`` over ``samples``, weighted by prompts."""
    if not samples:
        raise ValueError("no rows to diagnose")
    totals = dict.fromkeys(DIAGNOSTIC_KEYS, 0.0)
    for start in tqdm(range(0, len(samples), batch_size), desc="diagnose", disable=not progress, leave=False):
        chunk = list(samples[start : start + batch_size])
        rollout = collect(policy, chunk, source)
        rewards, _ = batch_standard_rewards(rollout.sid_index, rollout.target_sid)
        stats = candidate_stats(rollout, rewards, group_advantages(rewards, rollout.valid.cpu()))
        for k in DIAGNOSTIC_KEYS:
            totals[k] += stats[k] * len(chunk)
    return {k: v / len(samples) for k, v in totals.items()}


def candidate_source(
    checkpoint: LoadedCheckpoint, decoder: str, num_candidates: int, budget: int | None, seed: int = 0
) -> CandidateSource:
    """The candidate source named on the command line: ``beam`` or ``ved`` (with the checkpoint's value head)."""
    if decoder == "beam":
        return beam_source(num_candidates, budget)
    if decoder != "ved":
        raise ValueError(f"unknown decoder {decoder!r}; choose beam or ved")
    head = load_value_head(checkpoint, checkpoint.policy.device)
    require_module("models.ved", "--decoder ved")
    from models.ved import VEDConfig

    return ved_source(head, VEDConfig(num_candidates=num_candidates, budget=budget, seed=seed))
