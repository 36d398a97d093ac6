"""The value head and VED's settings between trainer, checkpoints and decoders.

A V-STAR checkpoint stores the value head's weights as the ``value_head`` extra
and its config (a ``ValueHeadConfig`` as a dict) as ``manifest["value_head"]``,
so the head is rebuilt from the checkpoint alone. Imports of ``models.value_head``
stay inside the functions so GRPO runs do not need it. An RL checkpoint's
manifest also holds the ``VEDConfig`` it trained with
(``manifest["rl_config"]["ved_config"]``); ``checkpoint_ved_config`` reads it
back for ``vstar eval`` and ``vstar diagnose``.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from models.checkpoint import CheckpointError, LoadedCheckpoint
from models.policy import Policy

if TYPE_CHECKING:
    from models.ved import VEDConfig


def new_value_head(policy: Policy) -> nn.Module:
    """A freshly initialised value head sized to ``policy``'s backbone, on its device."""
    from models.value_head import value_head_for

    return value_head_for(policy).to(policy.device)


def value_head_manifest(head: nn.Module) -> dict[str, Any]:
    config = head.config
    return asdict(config)


def load_value_head(checkpoint: LoadedCheckpoint, device: str | torch.device = "cpu") -> nn.Module:
    """The checkpoint's value head in eval mode; ``CheckpointError`` if it has none."""
    if "value_head" not in checkpoint.extras or "value_head" not in checkpoint.manifest:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} has no value head (only `vstar rl --algo vstar` writes one); "
            "use --decoder beam or a V-STAR checkpoint"
        )
    from models.value_head import ValueHead, ValueHeadConfig

    try:
        head = ValueHead(ValueHeadConfig(**checkpoint.manifest["value_head"]))
        head.load_state_dict(checkpoint.extras["value_head"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"checkpoint {checkpoint.path}: value_head.safetensors does not fit manifest['value_head']: {e}"
        ) from None
    return head.to(device).eval()


def checkpoint_ved_config(
    checkpoint: LoadedCheckpoint,
    num_candidates: int,
    budget: int | None = None,
    seed: int = 0,
    explore_slots: int | None = None,
) -> VEDConfig:
    """The VED settings ``checkpoint`` was trained with (``VEDConfig``'s defaults where it stores none), for
    ``num_candidates`` SIDs; ``budget`` and ``explore_slots`` override the stored ones when given."""
    from models.ved import VEDConfig

    stored = checkpoint.manifest.get("rl_config", {}).get("ved_config")
    base = VEDConfig(**stored) if stored else VEDConfig()
    return replace(
        base,
        num_candidates=num_candidates,
        budget=base.budget if budget is None else budget,
        explore_slots=base.explore_slots if explore_slots is None else explore_slots,
        seed=seed,
    )
