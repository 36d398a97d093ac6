"""Losses of the RL stage: the clipped policy-gradient terms, the k3 KL, the value TD loss.

Per-token log-probabilities use the full-vocabulary softmax (as TRL's GRPO and
the beam scores do), not the softmax renormalised over the trie's valid tokens.

Policy loss = GRPO + w_sib * Sibling-GRPO + beta * KL:

* GRPO: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) at every SID token of
  every candidate with the group advantage A of its candidate, averaged over
  the batch's candidate tokens (all candidates have the same length).
* Sibling-GRPO: the same clipped term with the sibling advantage at each token
  that belongs to a sibling set; each child token counts once (weights
  1/n(h+v) from ``rewards.sibling_advantages``) and the sum is divided by the
  number of child tokens, so the term has the per-token scale of GRPO.
* KL to the frozen reference, k3 estimator exp(q - p) - (q - p) - 1 with
  p = log pi(token), q = log pi_ref(token), averaged over candidate tokens.

Value loss: (V(s_l) - [r_l + gamma * V(s_{l+1})])^2 averaged over the states
s_0..s_D of every candidate path, the target detached. V reads the backbone's
last hidden states, detached by default: the value loss never moves the policy.
With ``detach=False`` the same loss reaches the backbone (``RLConfig.value_coef``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from training.rl.rewards import td_targets
from training.rl.rollout import SequenceBatch


def output_head(model: PreTrainedModel | nn.Module) -> nn.Linear:
    """The LM head of ``model`` (behind DDP's wrapper or not)."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    assert isinstance(inner, PreTrainedModel), f"expected a Hugging Face model, got {type(inner).__name__}"
    head = inner.get_output_embeddings()
    assert isinstance(head, nn.Linear), f"expected a linear LM head, got {type(head).__name__}"
    return head


def token_log_probs(
    model: PreTrainedModel | nn.Module, batch: SequenceBatch, want_hidden: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (N, D) of each candidate's SID tokens and, optionally, the last hidden states (N, T+D, H).

    The log-probs are float32 whatever the model runs in: under bf16 autocast (CUDA) or with a bf16 model
    the LM head's logits would be bf16 (8 mantissa bits: a logit of 20 is rounded to a multiple of 1/8), and
    upcasting them afterwards keeps that rounding in the ratio and the KL. There the head is applied again
    to the final hidden states in float32, autocast off; an fp32 model without autocast uses its own logits
    (the same computation, so fp32 results are unchanged).
    """
    d = batch.depth
    head = output_head(model)
    device_type = batch.input_ids.device.type
    fp32_head = head.weight.dtype != torch.float32 or torch.is_autocast_enabled(device_type)
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        logits_to_keep=1 if fp32_head else d + 1,
        output_hidden_states=want_hidden or fp32_head,
    )
    if fp32_head:
        with torch.autocast(device_type, enabled=False):
            last = out.hidden_states[-1][:, -d - 1 : -1, :].float()  # (N, D, H)
            bias = head.bias.float() if head.bias is not None else None
            logits = nn.functional.linear(last, head.weight.float(), bias)  # (N, D, V) float32
    else:
        logits = out.logits[:, :-1, :].float()  # (N, D, V): position T-1+l predicts token l
    tokens = batch.input_ids[:, -d:]  # (N, D)
    logp = logits.gather(-1, tokens[..., None]).squeeze(-1) - logits.logsumexp(-1)  # (N, D)
    return logp, (out.hidden_states[-1] if want_hidden else None)


def clipped_pg(ratio: torch.Tensor, adv: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """PPO's per-token loss -min(r * A, clip(r) * A); ratio and adv broadcast to (N, D)."""
    return -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref), (N, D); zero where the two agree."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def policy_loss(
    logp: torch.Tensor,  # (N, D) current policy
    old_logp: torch.Tensor,  # (N, D) rollout policy, detached
    ref_logp: torch.Tensor,  # (N, D) reference policy
    adv: torch.Tensor,  # (N,) group advantage of each candidate
    sib_adv: torch.Tensor,  # (N, D) sibling advantage per token
    sib_weight: torch.Tensor,  # (N, D) 1/n(h+v) for tokens in a sibling set, else 0
    clip_eps: float,
    beta: float,
    w_sib: float,
    token_scale: float = 1.0,  # factor on the per-token means (GRPO, KL); see training.distributed.loss_scales
    sibling_scale: float = 1.0,  # factor on the sibling mean
) -> tuple[torch.Tensor, dict[str, float]]:
    ratio = torch.exp(logp - old_logp)  # (N, D)
    grpo = clipped_pg(ratio, adv[:, None], clip_eps).mean()
    children = sib_weight.sum()
    sib = (clipped_pg(ratio, sib_adv, clip_eps) * sib_weight).sum() / children.clamp(min=1.0)
    kl = k3_kl(logp, ref_logp.detach()).mean()
    loss = token_scale * grpo + w_sib * (sibling_scale * sib) + beta * (token_scale * kl)  # 1.0: exactly the means
    clipped = ((ratio - 1).abs() > clip_eps).float().mean()
    stats = {
        "grpo_loss": grpo.item(),
        "sibling_loss": sib.item(),
        "kl": kl.item(),
        "clip_frac": clipped.item(),
        "sibling_tokens": children.item(),
    }
    return loss, stats


def value_td_loss(
    value_head: nn.Module,
    hidden: torch.Tensor,  # (N, T+D, H) backbone states
    attention_mask: torch.Tensor,  # (N, T+D)
    rewards: torch.Tensor,  # (N, D+1) reward of s_0 (0), s_1 .. s_D
    gamma: float,
    detach: bool = True,  # False: the loss's gradient also reaches the backbone through ``hidden``
) -> torch.Tensor:
    """Mean squared TD error over the D+1 states of each path (s_0 = the prompt's last position)."""
    states = rewards.shape[1]
    values = value_head((hidden.detach() if detach else hidden).float(), attention_mask)[:, -states:]  # (N, D+1)
    target = td_targets(rewards, values, gamma)  # (N, D+1)
    return nn.functional.mse_loss(values, target)
