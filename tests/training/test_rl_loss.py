"""``training.rl.loss``: float32 log-probs whatever precision the model runs in; the policy gradient's sign and
the value loss's states, pinned directly (before, only the slow two-process test caught a flipped ratio or
value states read from the prompt's start)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from models.policy import Policy
from training.bench.rl_bench import clone
from training.data.dataset import RecDataset
from training.rl.loss import policy_loss, token_log_probs, value_td_loss
from training.rl.rewards import td_targets
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


def test_the_policy_gradient_raises_the_log_prob_of_a_positive_advantage() -> None:
    """At the rollout policy (ratio 1, KL 0) the loss's gradient on a token's log-prob is -A / (N * D): descending
    it raises the log-probs of candidates with a positive advantage and lowers the others'."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -1.5, -2.5]], requires_grad=True)  # (N, D)
    adv = torch.tensor([1.0, -0.5])
    zeros = torch.zeros_like(logp)
    loss, _ = policy_loss(logp, logp.detach(), logp.detach(), adv, zeros, zeros, 0.2, 0.1, 1.0)
    loss.backward()
    assert logp.grad is not None
    torch.testing.assert_close(logp.grad, -adv[:, None].expand(2, 3) / 6)


def test_the_value_loss_reads_the_last_d_plus_1_states() -> None:
    """V at s_0 (the prompt's last position) .. s_D (the SID's last token): the sequence's last D + 1 positions,
    whatever the prompt's length; a head that returns each position's index shows which were read."""

    class PositionValue(torch.nn.Module):
        def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return hidden[..., 0]

    n, t, d = 2, 5, 3
    hidden = torch.arange(t + d, dtype=torch.float32)[None, :, None].expand(n, t + d, 4).clone()
    rewards = torch.tensor([[0.0, 0.3, 0.5, 1.0], [0.0, -0.1, -0.2, -0.4]])  # (N, D + 1)
    values = hidden[:, -(d + 1) :, 0]  # positions 4..7
    want = torch.nn.functional.mse_loss(values, td_targets(rewards, values, 0.9))
    got = value_td_loss(PositionValue(), hidden, torch.ones(n, t + d), rewards, 0.9)
    torch.testing.assert_close(got, want)
