"""Offline evaluation: decode every row of a split and score the ranked SIDs.

Rows are decoded in batches sorted by prompt length (less padding); results are
put back in row order before scoring. The decoder is beam search by default;
``decode_fn`` lets other decoders (VED) plug in with the same signature. A
decoder sees each batch's prompts and the item histories they encode, which is
what beam search's shallow fusion with the transition counts needs
(``models.transition``; a checkpoint's chosen fusion is ``checkpoint_fusion``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm import tqdm

from models.beam_search import BeamSearchConfig, DecodeResult, beam_search
from models.policy import Policy, pad_left
from models.transition import STATE_NAME as TRANSITIONS
from models.transition import ShallowFusion, TransitionCounts
from training.data import Sample
from training.metrics import CUTOFFS, beyond_accuracy, rank_metrics, tail_items, target_rank

Histories = Sequence[Sequence[int]]
DecodeFn = Callable[[Policy, torch.Tensor, torch.Tensor, Histories], DecodeResult]


def beam_decoder(num_beams: int, fusion: ShallowFusion | None = None) -> DecodeFn:
    """Constrained beam search; with ``fusion``, fused with the transition counts."""
    config = BeamSearchConfig(num_beams)

    def run(policy: Policy, ids: torch.Tensor, mask: torch.Tensor, histories: Histories) -> DecodeResult:
        bonus = fusion.node_bonus(histories, policy.catalog, policy.trie) if fusion else None
        return beam_search(policy.model, policy.trie, ids, mask, config, bonus)

    return run


def rank_samples(
    policy: Policy,
    samples: Sequence[Sample],
    decode: DecodeFn,
    batch_size: int = 32,
    progress: bool = True,
) -> list[list[int]]:
    """Ranked SID indices per sample, in the samples' order."""
    catalog = policy.catalog
    prompts = [policy.prompt.encode(policy.tokenizer, [catalog.sid_of(i) for i in s.history]) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: len(prompts[i]))
    ranked: list[list[int]] = [[] for _ in samples]
    was_training = policy.model.training
    policy.model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="decode", disable=not progress, leave=False):
            idx = order[start : start + batch_size]
            ids, mask = pad_left([prompts[i] for i in idx], int(policy.tokenizer.pad_token_id), policy.device)
            result = decode(policy, ids, mask, [samples[i].history for i in idx])
            for i, row in zip(idx, result.ranked(), strict=False):
                ranked[i] = row
    finally:
        policy.model.train(was_training)
    return ranked


def evaluate(
    policy: Policy,
    samples: Sequence[Sample],
    train_samples: Sequence[Sample],
    decode: DecodeFn,
    batch_size: int = 32,
    cutoffs: Sequence[int] = CUTOFFS,
    progress: bool = True,
) -> dict[str, Any]:
    """Metrics of ``decode`` on ``samples``; ``train_samples`` define the long tail."""
    start = time.perf_counter()
    ranked = rank_samples(policy, samples, decode, batch_size, progress)
    return score_rankings(ranked, samples, train_samples, policy.catalog, cutoffs, time.perf_counter() - start)


def score_rankings(
    ranked: Sequence[Sequence[int]],
    samples: Sequence[Sample],
    train_samples: Sequence[Sample],
    catalog: Any,
    cutoffs: Sequence[int] = CUTOFFS,
    seconds: float = 0.0,
) -> dict[str, Any]:
    targets = [catalog.sid_index[catalog.items[s.target].sid] for s in samples]
    metrics = rank_metrics(ranked, targets, cutoffs)
    ranks = [target_rank(lst, t) for lst, t in zip(ranked, targets, strict=True)]
    counts: Counter[int] = Counter()
    for s in train_samples:
        counts.update(s.history)
        counts[s.target] += 1
    metrics |= beyond_accuracy(ranked, catalog, tail_items(catalog, counts), k=10)
    # target_ranks (0-based, None: not ranked) let ``vstar compare`` pair two runs row by row
    return {"metrics": metrics, "rows": len(samples), "seconds": round(seconds, 2), "target_ranks": ranks}


def make_decoder(
    checkpoint: Any,
    name: str,
    beams: int,
    budget: int | None = None,
    fusion: ShallowFusion | None = None,
    explore_slots: int = 0,
) -> DecodeFn:
    """The decoder named on the command line, configured from a loaded checkpoint.

    ``ved`` returns ``beams`` SIDs searched with the checkpoint's value head (a
    ``CheckpointError`` if it has none) and VED settings, under a budget of
    ``budget`` tokens (default: the checkpoint's). Its exploratory slots are
    ``explore_slots``, 0 by default whatever the checkpoint trained with: RL
    gives slots of each group to first-level codes the rest missed, for the
    groups' diversity, but a recommendation list is best ranked by score (on
    held-out rows, 1 slot of 10 cost HR@10 0.131 -> 0.127, and even coverage).
    """
    if name == "beam":
        if budget is not None:
            raise ValueError("--budget applies to --decoder ved")
        return beam_decoder(beams, fusion)
    if fusion is not None:
        raise ValueError("shallow fusion applies to --decoder beam; pass --fusion-weight 0 with --decoder ved")
    if name == "ved":
        return ved_decoder(checkpoint, beams, budget, explore_slots)
    raise ValueError(f"unknown decoder {name!r}; choose beam or ved")


def ved_decoder(checkpoint: Any, num_candidates: int, budget: int | None, explore_slots: int = 0) -> DecodeFn:
    """VED with the checkpoint's value head and the VED settings it was trained with (``budget`` overrides)."""
    from training.rollout import require_module
    from training.value_io import checkpoint_ved_config, load_value_head

    head = load_value_head(checkpoint, checkpoint.policy.device)
    require_module("models.ved", "--decoder ved")
    from models.ved import ved_search

    config = checkpoint_ved_config(checkpoint, num_candidates, budget, explore_slots=explore_slots)

    def run(policy: Policy, ids: torch.Tensor, mask: torch.Tensor, histories: Histories) -> DecodeResult:
        with torch.no_grad():
            return ved_search(policy.model, head, policy.trie, ids, mask, config).decode

    return run


def checkpoint_fusion(checkpoint: Any, weight: float | None = None) -> ShallowFusion | None:
    """The shallow fusion a checkpoint was selected with, or with ``weight`` instead; None when off.

    ``weight`` None takes the checkpoint's chosen weight (none chosen: off); a
    weight above 0 needs the checkpoint's transition counts.
    """
    chosen = checkpoint.manifest.get("fusion") or {}
    w = float(chosen.get("weight", 0.0)) if weight is None else weight
    if w == 0:
        return None
    state = checkpoint.extras.get(TRANSITIONS)
    if state is None:
        raise ValueError(f"checkpoint {checkpoint.path} has no transition counts to fuse with; use --fusion-weight 0")
    return ShallowFusion(TransitionCounts.from_state(state), w)
