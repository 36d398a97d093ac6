"""Counter-based randomness of VED: Gumbel noise keyed by (seed, prompt, node id, code).

A hash of the seed and the prompt's tokens (blind to padding) keys each
prompt; a new node's noise is keyed by that and the node's id, so a prompt's
draws do not depend on its batch neighbours, and equal seeds give equal draws.
"""

from __future__ import annotations

import torch

from models.backbone import prompt_position_ids

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (int64 tensors holding values < 2**32; no overflow)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def prompt_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor, seed: int) -> torch.Tensor:
    """A 32-bit key per prompt from the seed and its tokens, blind to padding: (B,)."""
    tok = _mix32((input_ids.long() * 4099 + prompt_position_ids(attention_mask)) & _MASK32)  # (B, T)
    content = (tok * attention_mask.long()).sum(-1) & _MASK32  # (B,)
    return _mix32(content ^ _mix32(torch.tensor(seed & _MASK32, device=input_ids.device)))


def gumbel_noise(keys: torch.Tensor, counters: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Gumbel(0, 1) noise per (key, counter, code): keys, counters (N,) -> (N, C) float32."""
    if keys.device.type == "mps":  # MPS has no float64 (converting raises): the same draws, made on the CPU
        return gumbel_noise(keys.cpu(), counters.cpu(), num_codes).to(keys.device)
    codes = torch.arange(num_codes, device=keys.device)
    x = _mix32(keys[:, None] ^ _mix32((counters[:, None] * num_codes + codes) & _MASK32))  # (N, C)
    u = (x.double() + 0.5) / 2.0**32
    return (-torch.log(-torch.log(u))).float()
