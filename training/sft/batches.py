"""SFT's batches: a training row as (prompt, target) token ids, history cropping, and the padded batch.

The loss is on the target tokens only: ``collate`` labels every other position
-100. Cropping draws per step from ``(seed, step)``, so a resumed run crops as
the uninterrupted one would, and over the whole global batch, so a DDP rank
crops its slice as one process would.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from models.policy import Policy
from training.data.dataset import Sample


def encode_sample(policy: Policy, sample: Sample) -> tuple[list[int], list[int]]:
    cat = policy.catalog
    prompt = policy.prompt.encode(policy.tokenizer, [cat.sid_of(i) for i in sample.history])
    target = policy.tokenizer.convert_tokens_to_ids(list(cat.sid_of(sample.target)))
    assert isinstance(target, list)
    return prompt, list(target)


def crop_histories(
    policy: Policy,
    samples: Sequence[Sample],
    batch: Sequence[int],
    rows: list[tuple[list[int], list[int]]],
    prob: float,
    seed: tuple[int, int],
    last_item_prob: float = 0.0,
    start: int = 0,
) -> list[tuple[list[int], list[int]]]:
    """Cut some histories to a random recent suffix (``prob``) or to the last item alone (``last_item_prob``):
    more (recent item -> target) contexts per row; the last-item rows teach each observed transition on its
    own, as an item-to-item model counts it. A suffix is shorter than what the prompt shows of the history (its
    most recent ``max_history`` items): a longer one would leave the prompt as it was.

    ``rows`` are the encoded rows of ``batch[start : start + len(rows)]`` (``samples``' indices): a rank's
    slice of the global ``batch`` under DDP, all of it in one process. The draws run over the whole batch, so
    a rank crops its rows as one process would, whatever the world size."""
    rng = np.random.default_rng(list(seed))
    out = list(rows)
    window = policy.prompt.max_history
    for j, i in enumerate(batch[: start + len(rows)]):
        hist = samples[i].history
        shown = min(len(hist), window)  # the items the uncropped prompt holds
        if shown < 2:
            continue
        u = rng.random()
        if u < prob + last_item_prob:
            keep = 1 if u >= prob else int(rng.integers(1, shown))
            if j >= start:
                out[j - start] = encode_sample(policy, Sample(samples[i].user_id, hist[-keep:], samples[i].target))
    return out


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 except on the target tokens."""
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, t) in enumerate(rows):
        n = len(p) + len(t)
        ids[i, :n] = torch.tensor(p + t)
        labels[i, len(p) : n] = torch.tensor(t)
        mask[i, :n] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": positions}
