"""The RL stage's settings: ``RLConfig``, checked when built and stored whole in each RL checkpoint's manifest
(``rl_config``), and the defaults the CLI shows.

Why each default is what it is, and every deviation from the paper and from MiniOneRec, is in
``training.rl.trainer``'s module docstring; the measurements that chose them are in docs/rl-experiments.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from models.ved_config import VEDConfig
from training.rl.rewards import SIBLING_NORMS

ALGOS = ("grpo", "vstar")
VALUE_WARMUP = 200  # default warm-up steps (trainer's module doc)
EXPLORE_SLOTS = 2  # of the G = 16 candidates of a rollout: first-level codes the rest missed


def rollout_ved_config(budget: int | None = None, explore_slots: int = EXPLORE_SLOTS) -> VEDConfig:
    """VED's settings for RL rollouts: ``VEDConfig``'s search with exploratory slots in each group."""
    return VEDConfig(budget=budget, explore_slots=explore_slots)


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
    value_coef: float = 0.0  # weight of the value loss in the policy's loss (0: V_phi reads detached states)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    grad_clip: float = 1.0
    clip_eps: float = 0.2
    beta: float = 0.03  # KL weight: chosen on held-out valid rows where RL pays (docs/rl-experiments.md)
    w_sib: float = 1.0
    sibling_norm: str = "group"  # one of SIBLING_NORMS: the scale of sibling advantages (trainer's module doc)
    gamma: float = 0.99
    level_weights: tuple[float, ...] | None = None  # A's w_1..w_D; None: the default for the SIDs' depth (rewards)
    ppo_epochs: int = 1  # policy updates per rollout
    ved_config: VEDConfig = field(default_factory=rollout_ved_config)  # C's search; num_candidates is set to G
    value_warmup: int = VALUE_WARMUP  # TD-only steps of V_phi on beam candidates before RL (vstar only)
    train_splits: tuple[str, ...] = ("train",)
    holdout: int = 500
    fusion_weight: float | None = None  # shallow fusion of the result; None: the --init checkpoint's weight
    fused_rollouts: bool = False  # rollouts fused with the counts at that weight, as served (trainer's module doc)
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
        if self.value_coef < 0 or (self.value_coef > 0 and self.algo != "vstar"):
            raise ValueError(f"value_coef must be >= 0, and > 0 only with --algo vstar, got {self.value_coef}")
        if self.sibling_norm not in SIBLING_NORMS:
            raise ValueError(f"sibling_norm must be one of {SIBLING_NORMS}, got {self.sibling_norm!r}")
        if self.level_weights is not None and (
            not self.level_weights
            or not all(math.isfinite(w) and w >= 0 for w in self.level_weights)
            or not any(self.level_weights)
        ):
            raise ValueError(f"level weights must be finite, >= 0 and not all 0, got {self.level_weights}")
        if self.level_weights is not None and not (self.algo == "vstar" and self.dense):
            raise ValueError("level weights weigh V-STAR's dense reward: use them with --algo vstar, not --no-dense")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if "test" in self.train_splits:
            raise ValueError("training on the test split is not allowed")
        if self.fusion_weight is not None and self.fusion_weight < 0:
            raise ValueError(f"fusion_weight must be >= 0, got {self.fusion_weight}")
        if self.value_warmup < 0:
            raise ValueError(f"value_warmup must be >= 0, got {self.value_warmup}")
        if self.ved_config.budget is not None and not self.use_ved:
            raise ValueError("--budget is VED's token budget: use it with --algo vstar, without --no-ved")
        if self.ved_config.num_candidates != self.num_candidates:  # resolved, like ValueHeadConfig's defaults
            object.__setattr__(self, "ved_config", replace(self.ved_config, num_candidates=self.num_candidates))

    @property
    def use_sibling(self) -> bool:
        return self.algo == "vstar" and self.sibling

    @property
    def use_ved(self) -> bool:
        return self.algo == "vstar" and self.ved

    @property
    def use_value(self) -> bool:
        return self.algo == "vstar"

    def parts_in_use(self) -> str:
        """V-STAR's parts this run uses, in words: the config's ``sibling``/``ved``/``dense`` are True by default
        and GRPO ignores them, so its logged config alone reads as if GRPO ran VED."""
        if self.algo != "vstar":
            return "GRPO: beam-search groups, exact-match reward, no value head, no sibling term"
        parts = [
            "VED groups" if self.use_ved else "beam-search groups",
            "dense reward" if self.dense else "exact-match reward",
            "value head",
            "sibling term" if self.use_sibling else "no sibling term",
        ]
        return "V-STAR: " + ", ".join(parts)
