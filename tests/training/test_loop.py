"""The shared training loop, worked by hand: the data order, the learning-rate schedule, and the SFT loss.

SFT's loss is checked against a cross-entropy computed position by position in
float64: labels shifted by one (the last prompt token predicts the first SID
token), prompt and padding never trained, a padded row scored as it is alone,
and the training batch's first-target logits equal to what decoding's
left-padded prefill sees.
"""

from __future__ import annotations

import math

import pytest
import torch

from models.backbone import prefill
from models.policy import Policy
from training.data.dataset import RecDataset
from training.loop import epoch_batches
from training.optim import cosine_schedule
from training.sft.batches import collate, encode_sample


def test_each_epoch_visits_every_row_once_in_a_seeded_order() -> None:
    lengths = [(7 * i) % 13 for i in range(1000)]  # 1000 rows in batches of 6: 166 full ones and one of 4
    batches = epoch_batches(lengths, 6, seed=3, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert sorted(len(b) for b in batches) == [4] + [6] * 166 == sorted(map(len, epoch_batches(lengths, 6, 3, 1)))
    assert batches == epoch_batches(lengths, 6, seed=3, epoch=0)
    assert batches != epoch_batches(lengths, 6, seed=3, epoch=1) and batches != epoch_batches(lengths, 6, 4, 0)
    # rows sorted by length inside chunks of 32 batches (less padding), the batches then shuffled
    assert all(lengths[a] <= lengths[b] for batch in batches for a, b in zip(batch, batch[1:], strict=False))
    firsts = [lengths[b[0]] for b in batches]
    assert firsts != sorted(firsts)


def test_the_learning_rate_warms_up_then_decays_over_the_optimizer_steps() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = cosine_schedule(optimizer, warmup=2, total=6)
    lrs = []
    for _ in range(6):
        lrs.append(scheduler.get_last_lr()[0])  # the lr the step uses, as SFT logs it
        optimizer.step()
        scheduler.step()
    cosine = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]  # steps 3..6 over the 4 after warm-up
    assert lrs == pytest.approx([0.5, 1.0, *cosine])


def test_the_sft_loss_is_the_cross_entropy_of_the_target_tokens_alone(tiny_dataset: RecDataset) -> None:
    policy = Policy.from_preset("tiny", tiny_dataset.catalog, seed=0)
    model = policy.model.double().eval()
    samples = tiny_dataset.splits["train"][:6]
    rows = [encode_sample(policy, s) for s in samples]
    assert len({len(p) for p, _ in rows}) > 1  # rows of several lengths: the batch is padded
    batch = collate(rows, int(policy.tokenizer.pad_token_id))
    with torch.no_grad():
        loss = float(model(**batch).loss)
        batched = torch.log_softmax(model(**{k: v for k, v in batch.items() if k != "labels"}).logits, -1)
        alone = []
        for i, (prompt, target) in enumerate(rows):
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + target])).logits[0], -1)
            # position t predicts token t + 1: the last prompt position predicts the first SID token
            alone += [-float(logp[len(prompt) - 1 + j, tok]) for j, tok in enumerate(target)]
            in_batch = [-float(batched[i, len(prompt) - 1 + j, tok]) for j, tok in enumerate(target)]
            assert in_batch == pytest.approx(alone[-len(target) :], abs=1e-12)  # padding changes nothing
    assert loss == pytest.approx(sum(alone) / len(alone), abs=1e-6)  # transformers takes the loss in float32

    ids, mask = policy.encode_prompts([[policy.catalog.sid_of(i) for i in s.history] for s in samples])
    first = torch.log_softmax(prefill(model, ids, mask).logits, -1)  # decoding: left-padded, HF's positions
    for i, (prompt, _) in enumerate(rows):
        assert torch.allclose(first[i], batched[i, len(prompt) - 1], atol=1e-12)
