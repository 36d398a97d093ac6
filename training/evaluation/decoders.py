"""Decoders by name, configured from a checkpoint: the one place ``--decoder beam|ved`` is resolved.

A ``DecodeFn`` takes the policy, a batch of left-padded prompts and the item
histories they encode, and returns the ranked SIDs (``models.beam_search``'s
``DecodeResult``). ``make_decoder`` builds the one ``vstar eval`` names;
``ved_setup`` is what any VED consumer needs from a checkpoint (its value head
and the VED settings it trained with), shared with the RL stage's candidate
sources (``training.rl.diagnose``). ``models.transition.checkpoint_fusion``
(the service's too) is the shallow fusion with the transition counts a
checkpoint was selected with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from models.beam_search import BeamSearchConfig, DecodeResult, beam_search
from models.checkpoint import LoadedCheckpoint
from models.policy import Policy
from models.transition import ShallowFusion
from models.value_head import ValueHead, load_value_head
from models.ved import ved_search
from models.ved_config import VEDConfig, checkpoint_ved_config

DECODERS = ("beam", "ved")
Histories = Sequence[Sequence[int]]
DecodeFn = Callable[[Policy, torch.Tensor, torch.Tensor, Histories], DecodeResult]


def check_decoder(name: str) -> None:
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; choose beam or ved")


def ved_setup(
    checkpoint: LoadedCheckpoint,
    num_candidates: int,
    budget: int | None = None,
    seed: int = 0,
    explore_slots: int | None = None,
) -> tuple[ValueHead, VEDConfig]:
    """The checkpoint's value head (a ``CheckpointError`` if it has none) and the VED settings it trained with
    (``models.ved_config.checkpoint_ved_config``; ``budget`` and ``explore_slots`` override them)."""
    head = load_value_head(checkpoint, checkpoint.policy.device)
    return head, checkpoint_ved_config(checkpoint, num_candidates, budget, seed, explore_slots)


def beam_decoder(num_beams: int, fusion: ShallowFusion | None = None) -> DecodeFn:
    """Constrained beam search; with ``fusion``, fused with the transition counts."""
    config = BeamSearchConfig(num_beams)

    def run(policy: Policy, ids: torch.Tensor, mask: torch.Tensor, histories: Histories) -> DecodeResult:
        bonus = fusion.node_bonus(histories, policy.catalog, policy.trie) if fusion else None
        return beam_search(policy.model, policy.trie, ids, mask, config, bonus)

    return run


def make_decoder(
    checkpoint: LoadedCheckpoint,
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
    check_decoder(name)
    if name == "beam":  # vstar eval refuses --budget and --explore-slots with beam search before it loads anything
        return beam_decoder(beams, fusion)
    return ved_decoder(checkpoint, beams, budget, explore_slots, fusion)


def ved_decoder(
    checkpoint: LoadedCheckpoint,
    num_candidates: int,
    budget: int | None,
    explore_slots: int = 0,
    fusion: ShallowFusion | None = None,
) -> DecodeFn:
    """VED with the checkpoint's value head and the VED settings it was trained with (``budget`` overrides);
    with ``fusion``, fused with the transition counts where ``ved_search`` adds a bonus (the initial tree's
    prefix scores and the returned set's ranking)."""
    head, config = ved_setup(checkpoint, num_candidates, budget, explore_slots=explore_slots)

    def run(policy: Policy, ids: torch.Tensor, mask: torch.Tensor, histories: Histories) -> DecodeResult:
        bonus = fusion.node_bonus(histories, policy.catalog, policy.trie) if fusion else None
        with torch.no_grad():
            return ved_search(policy.model, head, policy.trie, ids, mask, config, bonus).decode

    return run
