"""Optimiser and numerics helpers both trainers use: the learning-rate schedule, the autocast dtype, seeding.

* ``cosine_schedule``: linear warm-up then cosine decay to 0 (SFT and RL alike).
* ``autocast_dtype``: fp32 on CPU, bf16 autocast on GPUs that support it;
  ``precision`` forces one or the other.
* ``flush_denormals``: denormal floats as zero while training on CPU, where they
  are slow; restored after, being process-wide state.
* ``rng_state`` / ``restore_rng_state``: the generators a resume state keeps, the
  CPU's and, training on a GPU, that device's (its dropout masks are drawn there).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain fp32). ``auto`` takes bf16 on a GPU that
    runs it natively (compute capability 8 or more, or ROCm); ``bf16`` also where the GPU emulates it."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        if not (device.type == "cpu" or (device.type == "cuda" and _cuda_bf16(device, emulated=True))):
            raise ValueError(f"precision bf16: {device} does not support bfloat16")
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and _cuda_bf16(device, emulated=False) else None


def _cuda_bf16(device: torch.device, emulated: bool) -> bool:
    """Whether the GPU ``device`` itself (not the current one, torch's default) supports bfloat16."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=emulated)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The torch generator states a resume state keeps: ``torch_rng`` (the CPU's) and, on a CUDA device,
    ``cuda_rng``, that device's: there dropout draws from the device's own generator, not the CPU's."""
    state = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Put back what ``rng_state`` kept (a state written before ``cuda_rng`` was kept: the CPU's alone)."""
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Treat denormal floats as zero while training on CPU (they are slow there: tiny gradients and Adam
    moments made steps up to ~10x slower in one run here); restored after, being process-wide state."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
