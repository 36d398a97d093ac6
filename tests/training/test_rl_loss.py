"""``training.rl.loss``: float32 log-probs whatever precision the model runs in; the policy gradient's sign and
the value loss's states, pinned directly (before, only the slow two-process test caught a flipped ratio or
value states read from the prompt's start); and the whole policy gradient of ``RLTrainer.step`` against the
issue's formulas written out one prompt, candidate and token at a time (``plain_policy_loss``), and the value
head's TD gradient likewise."""

from __future__ import annotations

import copy
import math
import statistics
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from models.policy import Policy
from models.value_head import value_head_for as new_value_head
from training.bench.rl_bench import clone
from training.data.dataset import RecDataset, Sample
from training.rl.config import RLConfig
from training.rl.loss import policy_loss, token_log_probs, value_td_loss
from training.rl.rewards import ADV_EPS, td_targets
from training.rl.rollout import SequenceBatch, beam_source, collect, sequences
from training.rl.trainer import RLTrainer


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


# ---- the trainer's policy gradient against a plain reference: rewards, advantages, log-probs, clip, KL


def reachable_samples(policy: Policy, data: RecDataset, num_candidates: int) -> list[Sample]:
    """Four training rows whose targets are replaced by the SID at ranks 0, 3 and 7 of beam search's
    ``num_candidates`` (so the groups carry signal), the last left unreached (a group of equal rewards)."""
    rows = data.splits["train"][:4]
    ranked = collect(policy, rows, beam_source(num_candidates)).sid_index.tolist()
    catalog = policy.catalog
    out = [Sample(r.user_id, r.history, catalog.items_of_sid[ranked[i][rank]][0]) for i, (r, rank) in
           enumerate(zip(rows[:3], (0, 3, 7), strict=True))]  # fmt: skip
    unreached = next(i for i in catalog.items if catalog.sid_index[catalog.sid_of(i)] not in ranked[3])
    return [*out, Sample(rows[3].user_id, rows[3].history, unreached)]


def plain_log_probs(model: torch.nn.Module, prompt: list[int], sid: list[int]) -> torch.Tensor:
    """(D,) log pi(sid[l] | prompt, sid[:l]) from one unpadded forward: the logits at position len(prompt) - 1 + l
    predict sid[l]."""
    logits = model(input_ids=torch.tensor([prompt + sid])).logits[0]  # (T + D, V)
    at = len(prompt) - 1
    return torch.stack([logits[at + i].log_softmax(-1)[tok] for i, tok in enumerate(sid)])


def plain_normalise(x: list[float], scale: float | None = None) -> list[float]:
    if len(x) < 2 or len(set(x)) == 1:
        return [0.0] * len(x)
    mean = sum(x) / len(x)
    std = math.sqrt(sum((v - mean) ** 2 for v in x) / (len(x) - 1))  # Bessel's
    return [(v - mean) / ((std if scale is None else scale) + ADV_EPS) for v in x]


def plain_rewards(cands: list[int], target: int) -> list[float]:
    """Exact match plus, when the target is among them, -1/log2(i + 2) for the wrong candidate at rank i,
    normalised so that these sum to -1."""
    if target not in cands:
        return [0.0] * len(cands)
    z = sum(1 / math.log2(i + 2) for i, c in enumerate(cands) if c != target)
    return [1.0 if c == target else -1 / math.log2(i + 2) / z for i, c in enumerate(cands)]


def plain_clipped(logp: torch.Tensor, old_logp: torch.Tensor, adv: float, eps: float) -> torch.Tensor:
    """-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) of one token."""
    ratio = torch.exp(logp - old_logp)
    return -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)


def plain_sibling_sets(paths: list[list[int]]) -> list[tuple[int, list[list[int]]]]:
    """(level, the candidates routed through each child) of every parent prefix with two children or more."""
    out = []
    for level in range(len(paths[0])):
        for parent in sorted({tuple(p[:level]) for p in paths}):
            children: dict[int, list[int]] = {}
            for g, p in enumerate(paths):
                if tuple(p[:level]) == parent:
                    children.setdefault(p[level], []).append(g)
            if len(children) >= 2:
                out.append((level, list(children.values())))
    return out


def plain_policy_loss(
    policy: Policy, old: Policy, reference: Policy, samples: list[Sample], config: RLConfig
) -> torch.Tensor:
    """The issue's loss written out per prompt, candidate and token: GRPO's clipped term with the group advantage
    at every token, Sibling-GRPO's once per child token, the k3 KL to ``reference``; ratios against ``old``."""
    rollout = collect(old, samples, beam_source(config.num_candidates))
    eps = config.clip_eps
    grpo, kl, sib = [], [], []
    for b in range(len(samples)):
        prompt = rollout.prompt_ids[b][rollout.prompt_mask[b].bool()].tolist()
        paths = [list(p) for p in rollout.paths(b)]
        rewards = plain_rewards(rollout.candidates(b), rollout.target_sid[b])
        adv = plain_normalise(rewards)
        logp = [plain_log_probs(policy.model, prompt, p) for p in paths]
        with torch.no_grad():
            old_logp = [plain_log_probs(old.model, prompt, p) for p in paths]
            ref_logp = [plain_log_probs(reference.model, prompt, p) for p in paths]
        for g, path in enumerate(paths):
            for level in range(len(path)):
                grpo.append(plain_clipped(logp[g][level], old_logp[g][level], adv[g], eps))
                delta = ref_logp[g][level] - logp[g][level]
                kl.append(torch.exp(delta) - delta - 1)
        scale = statistics.stdev(rewards) if config.sibling_norm == "group" else None
        for level, children in plain_sibling_sets(paths):
            child_reward = [sum(rewards[g] for g in m) / len(m) for m in children]
            for members, a in zip(children, plain_normalise(child_reward, scale), strict=True):
                g = members[0]  # the child's token: the candidates routed through it share it
                sib.append(plain_clipped(logp[g][level], old_logp[g][level], a, eps))
    return (
        torch.stack(grpo).mean()
        + config.w_sib * torch.stack(sib).sum() / len(sib)
        + config.beta * torch.stack(kl).mean()
    )


@pytest.mark.parametrize("sibling_norm", ["group", "siblings"])
def test_the_trainers_policy_gradient_is_the_plain_formulas(
    tiny_policy: Policy, tiny_dataset: RecDataset, sibling_norm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both of two PPO epochs' gradients of ``RLTrainer.step`` equal those of ``plain_policy_loss`` (one
    unpadded forward per candidate, rewards and advantages by hand, a loop over sibling sets): the first at
    ratio 1, the second after an update, with ratios against the rollout policy and a clip that bites."""
    g = 8
    samples = reachable_samples(tiny_policy, tiny_dataset, g)
    policy, reference = clone(tiny_policy), clone(tiny_policy)
    with torch.no_grad():  # a reference the policy differs from: the KL and its gradient are not 0
        for p in reference.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    config = RLConfig(
        algo="vstar", ved=False, dense=False, num_candidates=g, batch_size=4, lr=3e-3, beta=0.3, w_sib=0.7,
        clip_eps=0.02, sibling_norm=sibling_norm, ppo_epochs=2, grad_clip=1e9,
    )  # fmt: skip
    trainer = RLTrainer(policy, reference, config, 10, new_value_head(policy))
    seen: list[tuple[Policy, list[torch.Tensor]]] = []  # (the policy's weights, their gradient) per update
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(parameters: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        parameters = list(parameters)
        if parameters == list(policy.model.parameters()):
            seen.append((clone(policy), [p.grad.clone() for p in parameters]))
        return real_clip(parameters, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    rollout_policy = clone(policy)
    stats = trainer.step(samples)
    assert len(seen) == 2 and 0 < stats["clip_frac"] < 1  # the second epoch: some tokens clipped, not all
    for weights, grads in seen:
        loss = plain_policy_loss(weights, rollout_policy, reference, samples, config)
        want = torch.autograd.grad(loss, list(weights.model.parameters()), allow_unused=True)
        for got, w in zip(grads, want, strict=True):
            torch.testing.assert_close(got, torch.zeros_like(got) if w is None else w, rtol=1e-4, atol=1e-6)


def plain_dense_rewards(
    paths: list[list[int]], target_path: list[int], path_emb: list[np.ndarray], target_emb: np.ndarray
) -> list[list[float]]:
    """Per candidate, [0, r_1 .. r_D]: r_l = w_l where its prefix of l tokens is the target's, else -w_l x (1 - cos
    of the mean embedding of the candidates sharing that prefix with the target's embedding); w = (0.3, 0.5, 1)."""
    out = []
    for p in paths:
        r = [0.0]
        for level, w in enumerate((0.3, 0.5, 1.0), 1):
            if p[:level] == target_path[:level]:
                r.append(w)
                continue
            mean = np.mean([e for q, e in zip(paths, path_emb, strict=True) if q[:level] == p[:level]], axis=0)
            cos = float(mean @ target_emb) / float(np.linalg.norm(mean) * np.linalg.norm(target_emb))
            r.append(-w * (1 - cos))
        out.append(r)
    return out


def test_the_trainers_value_gradient_is_plain_td(
    tiny_policy: Policy, tiny_dataset: RecDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """V_phi's gradient in ``RLTrainer.step`` equals that of TD(0) written out per candidate: V at the prompt's
    last token and at each SID token (unpadded forwards of the policy before its update), targets r_l + gamma *
    V(s_{l+1}) held fixed, 0 past the last token, the dense rewards by hand."""
    g, gamma = 8, 0.9
    samples = reachable_samples(tiny_policy, tiny_dataset, g)
    policy, reference = clone(tiny_policy), clone(tiny_policy)
    torch.manual_seed(0)
    head = new_value_head(policy)
    config = RLConfig(algo="vstar", ved=False, num_candidates=g, batch_size=4, gamma=gamma, grad_clip=1e9)
    emb = tiny_dataset.embeddings
    assert emb is not None
    trainer = RLTrainer(policy, reference, config, 10, head, emb)
    seen: list[list[torch.Tensor]] = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(parameters: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        parameters = list(parameters)
        if parameters == list(head.parameters()):
            seen.append([p.grad.clone() for p in parameters])
        return real_clip(parameters, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    before, head_before = clone(policy), copy.deepcopy(head)
    trainer.step(samples)
    rollout = collect(before, samples, beam_source(g))
    catalog = before.catalog
    errors = []
    for b, sample in enumerate(samples):
        prompt = rollout.prompt_ids[b][rollout.prompt_mask[b].bool()].tolist()
        paths = [list(p) for p in rollout.paths(b)]
        sid_emb = [emb[catalog.items_of_sid[s]].mean(axis=0) for s in rollout.candidates(b)]
        rewards = plain_dense_rewards(paths, rollout.target_tokens[b].tolist(), sid_emb, emb[sample.target])
        for path, r in zip(paths, rewards, strict=True):
            with torch.no_grad():
                hidden = before.model(input_ids=torch.tensor([prompt + path]), output_hidden_states=True)
            states = hidden.hidden_states[-1]  # (1, T + D, H)
            v = head_before(states, torch.ones(states.shape[:2]))[0, -len(r) :]  # V(s_0) .. V(s_D)
            nxt = torch.cat([v[1:].detach(), v.new_zeros(1)])
            errors += list(v - (torch.tensor(r) + gamma * nxt))
    loss = torch.stack(errors).pow(2).mean()
    want = torch.autograd.grad(loss, list(head_before.parameters()))
    [got] = seen
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-6)
