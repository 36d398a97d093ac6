"""What is wrong with weights just loaded: checked alike for a checkpoint (``models.checkpoint``) and a
pretrained base model (``Policy.from_pretrained_lm``), each of which says it in its own words.

transformers fills a tensor missing from the file with fresh random values and only logs it, so a damaged or
cut-down folder would load and train (or serve) on noise; and nan or inf in a weight shows up later as the wrong
problem (a diverged run, or attention that reads the tokens after a position).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

FIT_NAMED = 3  # tensors a misfit's problem names, of however many


def fit_problem(fit: dict[str, Any], unexpected: bool = True) -> str | None:
    """The loading info of ``from_pretrained(..., output_loading_info=True)`` as a problem (a phrase), or None: a
    tensor missing (it would be random), one of another shape, and, with ``unexpected``, one the model has no
    place for (dropped)."""
    problems = [f"{k} is missing" for k in sorted(fit.get("missing_keys", ()))]
    if unexpected:
        problems += [f"{k} is not the model's" for k in sorted(fit.get("unexpected_keys", ()))]
    problems += [
        f"{k} is {tuple(stored)}, the model's {tuple(wanted)}"
        for k, stored, wanted in sorted(fit.get("mismatched_keys", ()))
    ]
    if not problems:
        return None
    more = f" (and {len(problems) - FIT_NAMED} more)" if len(problems) > FIT_NAMED else ""
    return "; ".join(problems[:FIT_NAMED]) + more


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor that holds nan or inf, or None."""
    return next((name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
