"""The value head between trainer, checkpoints and decoders.

A V-STAR checkpoint stores the value head's weights as the ``value_head`` extra
and its config (a ``ValueHeadConfig`` as a dict) as ``manifest["value_head"]``,
so the head is rebuilt from the checkpoint alone. Imports of ``models.value_head``
stay inside the functions so GRPO runs do not need it.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from models.checkpoint import CheckpointError, LoadedCheckpoint
from models.policy import Policy


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
