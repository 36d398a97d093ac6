"""RL stage: MiniOneRec's GRPO (``--algo grpo``) and V-STAR (``--algo vstar``) in one trainer.

One step, top to bottom (``RLTrainer.step``):

1. rollout: the value head V_phi is frozen; VED (or beam search) builds the
   candidate set C(x) of G = 16 SIDs per prompt;
2. reward: rule (exact match) + ranking reward per candidate;
3. advantage: group-normalised GRPO advantage, plus Sibling-GRPO advantages at
   the tokens whose parent prefix has >= 2 children in C(x);
4. loss: clipped importance-weighted policy gradient (GRPO + w_sib * Sibling)
   + beta * k3 KL to the frozen reference (the ``--init`` model); one optimizer
   step per inner epoch;
5. value: dense semantic rewards (or, with ``--no-dense``, the exact-match
   reward at the last level only) -> TD update of V_phi with its own optimizer.

``--algo grpo`` is steps 1-4 with beam search and no sibling term. The V-STAR
switches remove one part each: ``--no-sibling`` (D), ``--no-ved`` (C: beam
search builds C(x); the value head is still trained and saved), ``--no-dense``
(A: V_phi learns from the sparse terminal reward). "GRPO + Sibling" of the
ablation table is ``--algo vstar --no-ved``: without VED the value head does
not touch the policy.

Deviations from the papers and choices the papers leave open:

* Ranking reward: penalties normalised over the wrong candidates (they sum to
  exactly -1); MiniOneRec's code normalises over all G ranks. A group that
  reaches its target thus sums to 1 - 1 = 0 and one that does not is all 0:
  the logged reward mean is ~0 by construction; reachability and the
  within-group reward std are the informative figures.
* Advantages use the unbiased std (TRL); a sibling set with all children equal
  gets 0. Sibling terms count each child token once (weight 1/n(h+v)) and are
  averaged over child tokens, so w_sib = 1 puts them on GRPO's per-token scale.
* Sibling advantages are centred on the sibling set's mean and divided by the
  std of the whole group's rewards (``sibling_norm="group"``, the default), not
  by the set's own std as the method writes it (``--sibling-norm siblings``).
  With MiniOneRec's ranking reward a set whose children are all wrong differs
  only by rank penalties (a few hundredths); its own std blew those gaps up to
  full-size advantages. Measured on beam rollouts of the held-out SFT model
  (256 train rows, the groups that reach their target): sibling tokens off the
  target's path got mean |advantage| 0.71 (0.78 on it) with the set's std, 0.058
  (0.55 on it) with the group's. One epoch of V-STAR (beta 0.1) on the 2,000
  held-out valid rows, HR@10 / NDCG@10 of the policy by beam search (10
  beams) at the last step: the set's std 0.1280 / 0.0902, the group's 0.1340 /
  0.0940, the SFT init 0.1340 / 0.0928 (GRPO at beta 0.1: 0.1340 / 0.0943);
  the kept models by beam search of 50, paired over the same rows, group's
  minus set's: HR@3 +2.3% (95% interval -5.9, +9.9), NDCG@10 +2.9% (-1.2,
  +7.2), HR@10 -0.4% (-5.4, +4.6). A small, consistent gain rather than a
  proven one; the rule also removes a measured distortion, so it is the default.
  Where RL pays (SFT on train, V-STAR lr 3e-5 on valid less its 2,000 most
  recent rows, three epochs, scored on those by beam search of 50), the set's
  std against the group's: NDCG@10 -1.1% (-2.6, +0.2) fused with the counts at
  the served weight, -2.0% (-4.3, +0.3) for the policy alone.
* V_phi reads the backbone's last hidden states detached (the value loss never
  moves the policy), taken from the policy-loss forward, i.e. before the policy
  step: one forward serves both updates. TD runs along each candidate path over
  s_0 (the prompt, r = 0) .. s_D (the full SID, r = r_D, then terminal 0), so
  a prefix shared by k candidates contributes k transitions.
* ``--no-dense``: V_phi's only reward is the exact match (1 or 0) at s_D; the
  ranking part is a property of the whole list, not of one path.
* V_phi starts fresh (small random output layer) unless ``--init`` carries a
  value head, then warms up before the first RL step (``--value-warmup``,
  default 200 steps, ``value_warmup_step``): TD on the candidates of beam
  search of width G with the same rewards as step 5, the policy frozen (no
  policy update, no scheduler step, the step counter untouched). On the
  2,000 held-out valid rows (small preset; beam search's 16 best of width 32)
  its within-prompt rank correlation with the dense return at level 1 was
  0.21 / 0.18 / 0.22 / 0.25 after 100 / 200 / 400 / 800 steps, at the full
  SID 0.04 / -0.01 / 0.04 / 0.04 (value lr 3e-4 instead: 0.25 / 0.06 at
  800), and it ranked the target 6.7-7.5th of 16 where log-prob ranks it
  5.1th. VED's candidate sets did not change measurably with the warm-up (1 to
  800 steps: reachability 0.1515-0.155 with 2 exploratory slots): 200 steps
  (about 3 CPU minutes) keeps VED from starting on a random head, and longer
  buys nothing measured.
* VED's settings are ``ved_config`` (a ``VEDConfig``; its ``num_candidates``
  is always G), stored with the rest in the checkpoint's manifest so that
  ``vstar eval`` / ``vstar diagnose`` decode as training did. Rollouts give
  ``EXPLORE_SLOTS`` (2) of each group's 16 slots to first-level codes the
  other 14 missed: the least that spreads VED's groups over more first-level
  codes than beam search's at equal budget (7.66 vs 7.22 on the held-out
  rows, reachability 0.153 vs 0.159; ``models.ved``). Swept in RL too (V-STAR
  at lr 3e-5, three epochs of valid less its 2,000 most recent rows, scored on
  them by beam search of 50): 0, 4 and 8 slots against 2 moved NDCG@10 by
  -0.4%, +0.7% and -0.5%, every 95% interval across 0 (two seeds of 2
  slots differ by as much: HR@3 +1.2%, HR@10 -2.0%), while the groups'
  distinct first-level codes went from 6.4 to 8.8 and their reachability
  only from 0.165 to 0.162; 2 stays (docs/rl-experiments.md, "Exploratory slots"). VED
  draws with seed
  ``seed * 1_000_003 + step`` (new draws every step, reproducible); its
  default budget is VED's: 2x what beam search of width G feeds the backbone,
  G * (depth - 1) = 32 tokens for G = 16, so 64.
* ``fused_rollouts`` (off by default): the groups decoded as the result is
  served, fused with the transition counts (``training.rl.run``). Measured on
  the held-out rows above (GRPO seeds 0 and 1, V-STAR seed 0): reachability
  0.166 -> 0.181 (GRPO), 0.163 -> 0.176 (V-STAR), but the kept models' fused
  NDCG@10 against the same seed's plain run moved by +0.2% / -1.0% (GRPO) and
  +0.8% (V-STAR) at the served weight, inside the 2.0% two plain GRPO seeds
  differ by (docs/rl-experiments.md, "Fused rollouts").
* ``value_coef`` (0 by default, ``--value-coef``): the value head's TD loss,
  times this weight, also in the policy's loss, its gradient reaching the
  backbone through the states (PPO's shared actor-critic; V_phi's own weights
  still learn only in its own step). Tried at 1.0 against 0 where RL pays
  (V-STAR, seed 0, three epochs of valid less its 2,000 most recent rows,
  scored on those by beam search of 50): NDCG@10 -0.6% (-1.8, +0.4) fused at
  the served weight, -0.7% (-2.5, +0.9) alone, KL over the last 100 steps
  0.41 against 0.44; V ranked the target 7.6th of 16 against 7.0th. It stays off
  (docs/rl-experiments.md, "The value loss into the backbone").
* Learning rate: 1e-4 for the from-scratch presets (1/20 of SFT's 2e-3; the
  paper's 1e-5 is for pretrained LMs, pass ``--lr 1e-5`` with ``--base-model``
  SFT checkpoints); V_phi 1e-3. Batch: 16 prompts x 16 candidates per step.
* KL weight beta 0.03, not MiniOneRec's 1e-3: chosen among 0.1, 0.03 and 0.01
  on the 2,000 held-out valid rows where RL pays (SFT on train, GRPO on the
  rest of valid, three epochs): fused NDCG@10 0.0961 at 0.1, 0.0985 / 0.0986 at
  0.03 (seeds 0 / 1), 0.0979 at 0.01 (docs/rl-experiments.md, "The KL weight where RL pays").
  At 0.03 V-STAR's lr is the shared default 1e-4, not the 3e-5 chosen at 0.1:
  on another SFT model's held-out rows 1e-4 beat 3e-5 by NDCG@10 +1.9% (+0.1,
  +3.8) fused, +4.7% alone, and drew level with GRPO (+0.9%, two seeds each).
* Dropout is off during RL (policy and reference in eval mode): the importance
  ratio is exactly 1 on the first inner epoch and the KL compares like with like.
* Log-probs use the full-vocabulary softmax (TRL, beam scores), not the softmax
  renormalised over valid tokens.
* No separate reward model, no format reward, no title-alignment tasks
  (MiniOneRec mixes those into RL); rollouts are SID-only prompts.
* Model selection (``training.rl.run``): HR@10 (ties NDCG@10) by beam search on
  valid, or on the held-out valid rows when valid is trained on; the init
  model's score is logged as step 0 but never selected. Test is never looked at.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from models.policy import Policy
from models.transition import ShallowFusion
from models.value_head import ValueHead
from training.data.dataset import Sample
from training.distributed import loss_scales, sum_over_ranks, wrap_ddp
from training.loop import NonFinite
from training.optim import autocast_dtype, cosine_schedule
from training.rl.config import RLConfig
from training.rl.diagnose import candidate_stats
from training.rl.loss import policy_loss, token_log_probs, value_td_loss
from training.rl.rewards import (
    batch_sibling_advantages,
    batch_standard_rewards,
    batch_value_rewards,
    group_advantages,
    resolve_level_weights,
    sid_embeddings,
)
from training.rl.rollout import CandidateSource, SequenceBatch, beam_source, collect, sequences, ved_source


class RLTrainer:
    """Policy, frozen reference, optional value head and their optimizers; ``step`` is one RL step."""

    def __init__(
        self,
        policy: Policy,
        reference: Policy,
        config: RLConfig,
        total_steps: int,
        value_head: ValueHead | None = None,
        item_emb: np.ndarray | None = None,  # (items, dim); needed for dense rewards
        rollout_fusion: ShallowFusion | None = None,  # counts of the training rows; needed for fused rollouts
        precision: str = "auto",  # autocast: ``training.optim.autocast_dtype`` (the log-probs stay float32)
    ) -> None:
        if config.fused_rollouts and rollout_fusion is None:
            raise ValueError("fused rollouts need the transition counts and a fusion weight")
        if config.use_value and value_head is None:
            raise ValueError("--algo vstar needs a value head")
        if config.use_value and config.dense and item_emb is None:
            raise ValueError(
                "dense rewards need item embeddings (item_emb.npy in --data; vstar embed --data DIR --encoder PATH "
                "makes it from a local text encoder), or pass --no-dense"
            )
        self.policy, self.reference, self.config, self.value_head = policy, reference, config, value_head
        for p in reference.model.parameters():
            p.requires_grad_(False)
        reference.model.eval()
        policy.model.eval()  # dropout off: see the module docstring
        # the loss forwards go through these (DDP under torchrun; the modules themselves otherwise)
        self.policy_forward = wrap_ddp(policy.model)
        self.value_forward = wrap_ddp(value_head) if value_head is not None else None
        self.item_emb = item_emb
        self.rollout_fusion = rollout_fusion if config.fused_rollouts else None
        self.sid_emb = sid_embeddings(policy.catalog.items_of_sid, item_emb) if item_emb is not None else None
        self.level_weights = resolve_level_weights(config.level_weights, policy.catalog.depth)
        self.optimizer = torch.optim.AdamW(policy.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = cosine_schedule(self.optimizer, int(config.warmup_ratio * total_steps), total_steps)
        self.value_optimizer = (
            torch.optim.AdamW(value_head.parameters(), lr=config.value_lr) if value_head is not None else None
        )
        self.amp = autocast_dtype(policy.device, precision)
        self.step_count = 0

    def source(self) -> CandidateSource:
        c = self.config
        if not c.use_ved:
            return beam_source(c.num_candidates, fusion=self.rollout_fusion)
        assert self.value_head is not None
        config = replace(c.ved_config, seed=c.seed * 1_000_003 + self.step_count)
        return ved_source(self.value_head, config, self.rollout_fusion)

    def step(self, samples: list[Sample], counted: bool = True) -> dict[str, float]:
        """One RL step on ``samples``; returns the step's figures.

        Distributed, ``samples`` is this rank's shard and ``counted=False`` marks a stand-in shard
        (weight 0); the losses are scaled so that DDP's gradient is the global batch's.
        """
        start = time.perf_counter()
        lr = float(self.scheduler.get_last_lr()[0])  # this step's: the policy update steps the scheduler
        # 1. rollout: V_phi frozen, C(x) per prompt from VED (or beam search)
        rollout = collect(self.policy, samples, self.source())
        # every score nan or -inf: the weights overflowed; summed over the ranks, so that all of them stop here
        # together (a rank that went on would wait in DDP's all-reduce for the one that stopped)
        here = bool(rollout.valid.numel()) and not bool(rollout.valid.any())
        (ranks_without,) = sum_over_ranks([float(here)])
        if ranks_without:
            where = f"any of {len(samples)} prompts" if here else "any prompt of another rank's rollout"
            raise NonFinite(f"the policy scored no SID as finite for {where}")
        batch = sequences(rollout)
        # 2. reward: rule + ranking
        rewards, rule = batch_standard_rewards(rollout.sid_index, rollout.target_sid)  # (B, G) each
        # 3. advantage: group-wide, plus sibling sets
        adv = group_advantages(rewards, rollout.valid.cpu())  # (B, G)
        if self.config.use_sibling:
            sib_adv, sib_w = batch_sibling_advantages(
                rollout.token_ids, rollout.valid, rewards, self.config.sibling_norm
            )  # (B, G, D) each
        else:
            sib_adv = sib_w = torch.zeros(rollout.token_ids.shape)
        # 4. loss: GRPO + w_sib * Sibling-GRPO + beta * KL, then the policy step
        rows, cols = batch.row.cpu(), batch.col.cpu()  # (N,) each
        counts = [len(rows) * batch.depth, float(sib_w[rows, cols].sum())] if counted else [0, 0]
        scales = loss_scales(counts)  # [per-token terms, sibling term]; [1.0, 1.0] in one process
        v_rewards = None  # (N, D+1): dense (or terminal) rewards of each path's states, for V_phi
        if self.value_head is not None:
            sid_emb = self.sid_emb if self.config.dense else None
            v_rewards = batch_value_rewards(
                rollout.token_ids, rollout.sid_index, rollout.target_tokens, rollout.target_item, rule, sid_emb,
                self.item_emb, self.level_weights,
            )[rows, cols]  # fmt: skip
        stats, hidden = self.policy_update(
            batch, adv[rows, cols], sib_adv[rows, cols], sib_w[rows, cols], scales, v_rewards
        )
        # 5. TD update of V_phi
        value_loss = float("nan")
        if self.value_head is not None:
            assert hidden is not None and v_rewards is not None
            value_loss = self.value_update(hidden, batch.attention_mask, v_rewards, scales[0])
        self.step_count += 1
        figures = {
            "value_loss": value_loss,
            "lr": lr,
            "seconds": time.perf_counter() - start,
        }
        return candidate_stats(rollout, rewards, adv) | stats | figures

    def value_warmup_step(self, samples: list[Sample], counted: bool = True) -> dict[str, float]:
        """One warm-up step: TD of V_phi on beam search's G candidates with step 5's rewards; the policy,
        its optimizer and scheduler and the step counter are untouched."""
        assert self.value_head is not None
        start = time.perf_counter()
        rollout = collect(self.policy, samples, beam_source(self.config.num_candidates))
        batch = sequences(rollout)
        _, rule = batch_standard_rewards(rollout.sid_index, rollout.target_sid)
        with torch.no_grad(), self.autocast():
            _, hidden = token_log_probs(self.policy.model, batch, want_hidden=True)  # (N, T+D, H)
        assert hidden is not None
        v_rewards = batch_value_rewards(
            rollout.token_ids, rollout.sid_index, rollout.target_tokens, rollout.target_item, rule,
            self.sid_emb if self.config.dense else None, self.item_emb, self.level_weights,
        )  # (B, G, D+1)  # fmt: skip
        rows, cols = batch.row.cpu(), batch.col.cpu()
        scale = loss_scales([len(rows) * batch.depth] if counted else [0])[0]
        loss = self.value_update(hidden, batch.attention_mask, v_rewards[rows, cols], scale)
        return {"value_loss": loss, "seconds": time.perf_counter() - start}

    def policy_update(
        self,
        batch: SequenceBatch,
        adv: torch.Tensor,  # (N,) group advantage per candidate
        sib_adv: torch.Tensor,  # (N, D)
        sib_w: torch.Tensor,  # (N, D)
        scales: list[float] | None = None,  # loss factors [per-token, sibling] (training.distributed)
        value_rewards: torch.Tensor | None = None,  # (N, D+1) V_phi's rewards; needed when value_coef > 0
    ) -> tuple[dict[str, float], torch.Tensor | None]:
        """``ppo_epochs`` clipped updates on one rollout; returns the figures of the last and the
        detached backbone states (N, T+D, H) of the first forward (for V_phi), or None without a value head.

        With ``value_coef`` > 0 the loss also holds ``value_coef`` x the TD loss of V_phi on the
        backbone's states, not detached: its gradient trains the backbone; V_phi's own parameters
        learn only in ``value_update``, which discards this backward's gradient on them."""
        c, dev = self.config, self.policy.device
        adv, sib_adv, sib_w = adv.to(dev), sib_adv.to(dev), sib_w.to(dev)
        scales = scales or [1.0, 1.0]
        aux = c.value_coef > 0 and self.value_head is not None
        if aux:
            assert value_rewards is not None, "value_coef > 0 needs the value rewards"
            value_rewards = value_rewards.to(dev)
        with torch.no_grad(), self.autocast():
            ref_logp, _ = token_log_probs(self.reference.model, batch)  # (N, D)
        old_logp = hidden = None
        for epoch in range(c.ppo_epochs):
            with self.autocast():
                want_hidden = (epoch == 0 or aux) and self.value_head is not None
                logp, h = token_log_probs(self.policy_forward, batch, want_hidden)  # (N, D), (N, T+D, H) | None
            if epoch == 0:  # the rollout policy's log-probs: ratio 1 on the first epoch
                old_logp, hidden = logp.detach(), (h.detach() if h is not None else None)
            assert old_logp is not None
            loss, stats = policy_loss(
                logp, old_logp, ref_logp, adv, sib_adv, sib_w, c.clip_eps, c.beta, c.w_sib, *scales
            )
            if aux:
                assert self.value_head is not None and value_rewards is not None and h is not None
                td = value_td_loss(self.value_head, h, batch.attention_mask, value_rewards, c.gamma, detach=False)
                loss = loss + c.value_coef * scales[0] * td
                stats["value_aux_loss"] = td.item()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.policy.model.parameters(), c.grad_clip)
            self.optimizer.step()
        self.scheduler.step()
        return stats | {"loss": loss.item()}, hidden

    def value_update(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, rewards: torch.Tensor, scale: float = 1.0
    ) -> float:
        """One TD step of V_phi with its own optimizer: hidden (N, T+D, H), rewards (N, D+1) of s_0..s_D.

        ``scale`` multiplies the loss before backward (``training.distributed.loss_scales``)."""
        assert self.value_head is not None and self.value_forward is not None and self.value_optimizer is not None
        self.value_head.train()
        loss = value_td_loss(self.value_forward, hidden, attention_mask, rewards.to(hidden.device), self.config.gamma)
        self.value_optimizer.zero_grad(set_to_none=True)
        (loss * scale).backward()
        torch.nn.utils.clip_grad_norm_(self.value_head.parameters(), self.config.grad_clip)
        self.value_optimizer.step()
        self.value_head.eval()
        return loss.item()

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.policy.device.type, dtype=self.amp, enabled=self.amp is not None)

    def state_dict(self) -> dict[str, Any]:
        out = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step_count": self.step_count,
        }
        if self.value_optimizer is not None:
            out["value_optimizer"] = self.value_optimizer.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_count = int(state["step_count"])
        if self.value_optimizer is not None:
            self.value_optimizer.load_state_dict(state["value_optimizer"])
