"""``training.rl.loss.token_log_probs``: float32 log-probs whatever precision the model runs in."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from models.policy import Policy
from training.bench.rl_bench import clone
from training.data.dataset import RecDataset
from training.rl.loss import token_log_probs
from training.rl.rollout import SequenceBatch, beam_source, collect, sequences


def rollout_batch(policy: Policy, data: RecDataset) -> SequenceBatch:
    return sequences(collect(policy, data.splits["train"][:4], beam_source(8)))


def head_log_probs(policy: Policy, batch: SequenceBatch) -> torch.Tensor:
    """The wanted log-probs: the final states (as the model computed them) -> LM head in float32 -> log_softmax."""
    d = batch.depth
    out = policy.model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        output_hidden_states=True,
    )
    head = policy.model.get_output_embeddings()
    with torch.autocast("cpu", enabled=False):
        logits = F.linear(out.hidden_states[-1][:, -d - 1 : -1].float(), head.weight.float())  # (N, D, V)
    return logits.log_softmax(-1).gather(-1, batch.input_ids[:, -d:, None]).squeeze(-1)


@torch.no_grad()
def test_fp32_log_probs_are_the_models_own_logits(tiny_policy: Policy, tiny_dataset: RecDataset) -> None:
    batch = rollout_batch(tiny_policy, tiny_dataset)
    logp, _ = token_log_probs(tiny_policy.model, batch)
    out = tiny_policy.model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False
    )
    d = batch.depth
    want = out.logits[:, -d - 1 : -1].log_softmax(-1).gather(-1, batch.input_ids[:, -d:, None]).squeeze(-1)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, want, rtol=0, atol=1e-6)


@torch.no_grad()
def test_log_probs_under_bf16_autocast_come_from_float32_logits(tiny_policy: Policy, tiny_dataset: RecDataset) -> None:
    policy = clone(tiny_policy)
    policy.model.get_output_embeddings().weight.mul_(20.0)  # logits of a trained model's size (bf16 steps of 1/8)
    batch = rollout_batch(policy, tiny_dataset)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, hidden = token_log_probs(policy.model, batch, want_hidden=True)
        want = head_log_probs(policy, batch)
    assert logp.dtype == torch.float32 and hidden is not None
    # from bf16 logits (upcast after the head) the error was 4e-2 here
    torch.testing.assert_close(logp, want, rtol=0, atol=1e-5)


@torch.no_grad()
def test_log_probs_of_a_bf16_model_come_from_float32_logits(tiny_policy: Policy, tiny_dataset: RecDataset) -> None:
    policy = clone(tiny_policy)
    policy.model.get_output_embeddings().weight.mul_(20.0)
    batch = rollout_batch(policy, tiny_dataset)
    policy.model.to(torch.bfloat16)
    logp, _ = token_log_probs(policy.model, batch)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, head_log_probs(policy, batch), rtol=0, atol=1e-5)
