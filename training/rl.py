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
  exactly -1); MiniOneRec's code normalises over all G ranks.
* Advantages use the unbiased std (TRL); a sibling set with all children equal
  gets 0. Sibling terms count each child token once (weight 1/n(h+v)) and are
  averaged over child tokens, so w_sib = 1 puts them on GRPO's per-token scale.
* V_phi reads the backbone's last hidden states detached (the value loss never
  moves the policy), taken from the policy-loss forward, i.e. before the policy
  step: one forward serves both updates. TD runs along each candidate path over
  s_0 (the prompt, r = 0) .. s_D (the full SID, r = r_D, then terminal 0), so
  a prefix shared by k candidates contributes k transitions.
* Dropout is off during RL (policy and reference in eval mode): the importance
  ratio is exactly 1 on the first inner epoch and the KL compares like with like.
* Log-probs use the full-vocabulary softmax (TRL, beam scores), not the softmax
  renormalised over valid tokens.
* No separate reward model, no format reward, no title-alignment tasks
  (MiniOneRec mixes those into RL); rollouts are SID-only prompts.
* Model selection: HR@10 (ties NDCG@10) by beam search on valid, or on the held-
  out valid rows when valid is trained on; the init model's score is logged as
  step 0 but never selected. Test is never looked at.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.checkpoint import load_checkpoint, save_checkpoint
from models.policy import Policy
from training.data import RecDataset, Sample
from training.diagnose import candidate_stats
from training.evaluate import beam_decoder, evaluate
from training.rewards import (
    LEVEL_WEIGHTS,
    batch_sibling_advantages,
    batch_standard_rewards,
    batch_value_rewards,
    group_advantages,
    sid_embeddings,
)
from training.rl_loss import policy_loss, token_log_probs, value_td_loss
from training.rollout import CandidateSource, beam_source, collect, require_module, sequences, ved_source
from training.sft import SFTConfig, autocast_dtype, cosine_schedule, epoch_batches, seed_everything, split_for_training
from training.value_io import load_value_head, new_value_head, value_head_manifest

log = logging.getLogger(__name__)
ALGOS = ("grpo", "vstar")


@dataclass(frozen=True)
class RLConfig:
    algo: str = "grpo"
    sibling: bool = True  # D: Sibling-GRPO term (vstar only)
    ved: bool = True  # C: VED builds C(x) (vstar only); else beam search
    dense: bool = True  # A: dense semantic TD rewards (vstar only); else terminal exact match
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 16  # prompts per step; each brings num_candidates sequences
    num_candidates: int = 16
    lr: float = 1e-4  # from-scratch presets (SFT lr 2e-3); ~1e-5 for pretrained LMs
    value_lr: float = 1e-3  # V_phi is fresh and small; its own AdamW
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    grad_clip: float = 1.0
    clip_eps: float = 0.2
    beta: float = 1e-3  # KL weight
    w_sib: float = 1.0
    gamma: float = 0.99
    level_weights: tuple[float, ...] = LEVEL_WEIGHTS
    ppo_epochs: int = 1  # policy updates per rollout
    ved_budget: int | None = None  # tokens per prompt; None: VED's default
    ved_init_beams: int = 8
    ved_lam: float = 0.1
    ved_beta: float = 1.0
    train_splits: tuple[str, ...] = ("train",)
    holdout: int = 500
    eval_every: int = 100  # steps between validations
    eval_limit: int = 1000
    eval_beams: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        if self.algo == "grpo" and not (self.sibling and self.ved and self.dense):
            raise ValueError("--no-sibling/--no-ved/--no-dense switch off parts of V-STAR: use them with --algo vstar")
        if self.epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError("epochs and max_steps must be >= 1")
        if self.batch_size < 1 or self.num_candidates < 2:
            raise ValueError("batch_size must be >= 1 and num_candidates >= 2 (a group needs two members)")
        if self.lr <= 0 or self.value_lr <= 0 or self.clip_eps <= 0 or self.beta < 0 or self.ppo_epochs < 1:
            raise ValueError("lr, value_lr and clip_eps must be > 0, beta >= 0, ppo_epochs >= 1")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if "test" in self.train_splits:
            raise ValueError("training on the test split is not allowed")

    @property
    def use_sibling(self) -> bool:
        return self.algo == "vstar" and self.sibling

    @property
    def use_ved(self) -> bool:
        return self.algo == "vstar" and self.ved

    @property
    def use_value(self) -> bool:
        return self.algo == "vstar"


@dataclass
class RLState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best: tuple[float, float] = (-1.0, -1.0)
    history: list[dict[str, Any]] = field(default_factory=list)


class RLTrainer:
    """Policy, frozen reference, optional value head and their optimizers; ``step`` is one RL step."""

    def __init__(
        self,
        policy: Policy,
        reference: Policy,
        config: RLConfig,
        total_steps: int,
        value_head: nn.Module | None = None,
        item_emb: np.ndarray | None = None,  # (items, dim); needed for dense rewards
    ) -> None:
        if config.use_value and value_head is None:
            raise ValueError("--algo vstar needs a value head")
        if config.use_value and config.dense and item_emb is None:
            raise ValueError("dense rewards need item embeddings (item_emb.npy in --data), or pass --no-dense")
        self.policy, self.reference, self.config, self.value_head = policy, reference, config, value_head
        for p in reference.model.parameters():
            p.requires_grad_(False)
        reference.model.eval()
        policy.model.eval()  # dropout off: see the module docstring
        self.item_emb = item_emb
        self.sid_emb = sid_embeddings(policy.catalog.items_of_sid, item_emb) if item_emb is not None else None
        self.optimizer = torch.optim.AdamW(policy.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = cosine_schedule(self.optimizer, int(config.warmup_ratio * total_steps), total_steps)
        self.value_optimizer = (
            torch.optim.AdamW(value_head.parameters(), lr=config.value_lr) if value_head is not None else None
        )
        self.amp = autocast_dtype(policy.device)
        self.step_count = 0

    def source(self) -> CandidateSource:
        c = self.config
        if not c.use_ved:
            return beam_source(c.num_candidates)
        from models.ved import VEDConfig

        ved = VEDConfig(
            num_candidates=c.num_candidates,
            init_beams=c.ved_init_beams,
            budget=c.ved_budget,
            lam=c.ved_lam,
            beta=c.ved_beta,
            seed=c.seed * 1_000_003 + self.step_count,
        )
        assert self.value_head is not None
        return ved_source(self.value_head, ved)

    def step(self, samples: list[Sample]) -> dict[str, float]:
        c = self.config
        start = time.perf_counter()
        # 1. rollout: C(x) per prompt
        rollout = collect(self.policy, samples, self.source())
        batch = sequences(rollout)
        rows, cols = batch.row.cpu(), batch.col.cpu()  # (N,) each
        # 2. reward
        rewards, rule = batch_standard_rewards(rollout.sid_index, rollout.target_sid)  # (B, G) each
        # 3. advantage
        adv = group_advantages(rewards, rollout.valid.cpu())  # (B, G)
        if c.use_sibling:
            sib_adv, sib_w = batch_sibling_advantages(rollout.token_ids, rollout.valid, rewards)  # (B, G, D) each
        else:
            sib_adv = sib_w = torch.zeros(rollout.token_ids.shape)
        # 4. loss: policy update(s)
        dev = self.policy.device
        adv_n, sib_adv_n, sib_w_n = (t[rows, cols].to(dev) for t in (adv, sib_adv, sib_w))  # (N,), (N, D), (N, D)
        with torch.no_grad(), self.autocast():
            ref_logp, _ = token_log_probs(self.reference.model, batch)  # (N, D)
        old_logp = hidden = None
        for _ in range(c.ppo_epochs):
            with self.autocast():
                logp, h = token_log_probs(
                    self.policy.model, batch, want_hidden=hidden is None and self.value_head is not None
                )
            if old_logp is None:
                old_logp, hidden = logp.detach(), (h.detach() if h is not None else None)
            loss, stats = policy_loss(logp, old_logp, ref_logp, adv_n, sib_adv_n, sib_w_n, c.clip_eps, c.beta, c.w_sib)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.policy.model.parameters(), c.grad_clip)
            self.optimizer.step()
        self.scheduler.step()
        # 5. dense rewards -> TD update of V_phi
        value_loss = float("nan")
        if self.value_head is not None:
            assert hidden is not None and self.value_optimizer is not None
            sid_emb = self.sid_emb if c.dense else None
            v_rewards = batch_value_rewards(
                rollout.token_ids,
                rollout.sid_index,
                rollout.target_tokens,
                rollout.target_item,
                rule,
                sid_emb,
                self.item_emb,
                c.level_weights,
            )[rows, cols].to(dev)  # (N, D+1)
            self.value_head.train()
            v_loss = value_td_loss(self.value_head, hidden, batch.attention_mask, v_rewards, c.gamma)
            self.value_optimizer.zero_grad(set_to_none=True)
            v_loss.backward()
            torch.nn.utils.clip_grad_norm_(self.value_head.parameters(), c.grad_clip)
            self.value_optimizer.step()
            self.value_head.eval()
            value_loss = v_loss.item()
        self.step_count += 1
        return (
            candidate_stats(rollout, rewards, adv)
            | stats
            | {
                "loss": loss.item(),
                "value_loss": value_loss,
                "lr": self.scheduler.get_last_lr()[0],
                "seconds": time.perf_counter() - start,
            }
        )

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


def check_catalog(policy: Policy, data: RecDataset) -> None:
    if policy.catalog.to_index() != data.catalog.to_index():
        raise ValueError(f"the --init checkpoint was trained on another catalog than {data.name}: its SIDs differ")


def train_rl(
    data: RecDataset,
    init: str | Path,
    out: str | Path,
    config: RLConfig,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """RL from the ``init`` checkpoint; the best model by validation goes to ``out``. Returns a summary."""
    out = Path(out)
    resume_dir = out.parent / f"{out.name}.resume"
    steps_file = out.parent / f"{out.name}.steps.jsonl"
    if config.use_value:
        require_module("models.value_head", "--algo vstar (the value head)")
    if config.use_ved:
        require_module("models.ved", "--algo vstar (VED builds the candidate sets; --no-ved uses beam search)")
    seed_everything(config.seed)
    train_rows, select_rows = split_for_training(
        data, SFTConfig(train_splits=config.train_splits, holdout=config.holdout)
    )
    select_rows = select_rows[: config.eval_limit]
    if not train_rows:
        raise ValueError("no training rows: check --train-splits")
    start_ckpt = load_checkpoint(init, device)
    check_catalog(start_ckpt.policy, data)
    reference = load_checkpoint(init, device).policy
    trainer_state = None
    if resume:
        if not resume_dir.exists():
            raise ValueError(f"--resume: no interrupted run at {resume_dir}")
        start_ckpt = load_checkpoint(resume_dir, device)
        trainer_state = start_ckpt.trainer_state()
        if (
            trainer_state is None
            or trainer_state.get("config") != asdict(config)
            or trainer_state.get("init") != str(init)
        ):
            raise ValueError(f"--resume: {resume_dir} was written with a different configuration or --init")
    policy = start_ckpt.policy
    value_head = None
    if config.use_value:
        value_head = (
            load_value_head(start_ckpt, device) if "value_head" in start_ckpt.extras else new_value_head(policy)
        )
    total_steps = config.max_steps or math.ceil(len(train_rows) / config.batch_size) * config.epochs
    trainer = RLTrainer(policy, reference, config, total_steps, value_head, data.embeddings)
    state = RLState()
    if trainer_state is not None:
        trainer.load_state_dict(trainer_state["trainer"])
        state = RLState(**trainer_state["state"])
        torch.set_rng_state(trainer_state["torch_rng"])
        kept = (
            [ln for ln in steps_file.read_text().splitlines() if json.loads(ln)["step"] <= state.step]
            if steps_file.exists()
            else []
        )
        steps_file.write_text("".join(ln + "\n" for ln in kept))
    elif steps_file.exists():
        steps_file.unlink()
    manifest: dict[str, Any] = {
        "stage": "rl",
        "rl_config": asdict(config),
        "init": str(init),
        "data": {"name": data.name, "fingerprint": data.fingerprint(), "train_rows": len(train_rows)},
    }
    if value_head is not None:
        manifest["value_head"] = value_head_manifest(value_head)
    log.info(
        "RL config %s; %d training rows, %d selection rows, %d steps",
        asdict(config),
        len(train_rows),
        len(select_rows),
        total_steps,
    )

    def validate() -> None:
        m = evaluate(policy, select_rows, train_rows, beam_decoder(config.eval_beams), progress=False)["metrics"]
        score = (m["HR@10"], m["NDCG@10"])
        state.history.append({"step": state.step, "epoch": state.epoch, "HR@10": score[0], "NDCG@10": score[1]})
        log.info("step %d: selection HR@10 %.4f NDCG@10 %.4f", state.step, *score)
        extras = {"value_head": value_head.state_dict()} if value_head is not None else {}
        if state.step > 0 and score > state.best:
            state.best = score
            save_checkpoint(out, policy, manifest | {"selection": state.history[-1]}, extras)
        save_checkpoint(
            resume_dir,
            policy,
            manifest,
            extras,
            trainer_state={
                "config": asdict(config),
                "init": str(init),
                "trainer": trainer.state_dict(),
                "state": asdict(state),
                "torch_rng": torch.get_rng_state(),
            },
        )

    if trainer_state is None:
        validate()
    lengths = [len(s.history) for s in train_rows]
    start, seconds = time.perf_counter(), []
    bar = tqdm(total=total_steps, initial=state.step, desc=f"rl {config.algo}", disable=not progress)
    while state.step < total_steps:
        batches = epoch_batches(lengths, config.batch_size, config.seed, state.epoch)
        for bi in range(state.batch_in_epoch, len(batches)):
            stats = trainer.step([train_rows[i] for i in batches[bi]])
            state.step, state.batch_in_epoch = state.step + 1, bi + 1
            seconds.append(stats["seconds"])
            with steps_file.open("a") as f:
                f.write(json.dumps({"step": state.step, "epoch": state.epoch} | stats) + "\n")
            bar.update(1)
            bar.set_postfix(
                r=f"{stats['reward_mean']:.3f}", reach=f"{stats['reachability']:.2f}", kl=f"{stats['kl']:.4f}"
            )
            if state.step % config.eval_every == 0 or state.step >= total_steps:
                validate()
            if state.step >= total_steps:
                break
        if state.batch_in_epoch >= len(batches):
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    bar.close()
    return {
        "best": {"HR@10": state.best[0], "NDCG@10": state.best[1]},
        "steps": state.step,
        "seconds": round(time.perf_counter() - start, 1),
        "s_per_step": round(float(np.mean(seconds)), 3) if seconds else None,
        "history": state.history,
        "steps_log": str(steps_file),
        "train_rows": len(train_rows),
        "selection_rows": len(select_rows),
    }
