"""``vstar bench train``: seconds per RL step of GRPO and of V-STAR, same batch, same start model.

Each trainer starts from its own copy of the same weights (policy and frozen
reference), runs one untimed warm-up step, then ``steps`` timed steps on the
same prompts, a step of each in turn (``training.bench.timing``), so that load
from other processes and the machine's drift hit both alike; both trainers are
held at once for that. Each timed step waits for the device's queued work
before the clock is read. Without ``--data`` the setup is a synthetic catalog
and random histories with a random preset model, so the bench runs anywhere in
seconds; with ``--data`` (and ``--checkpoint``) it times the real
configuration. The JSON holds the two figures; the ratio is printed alongside.

CPU threads default to one (``--threads``): on a shared machine, torch's
intra-op threads spin-wait on each other under load, and VED's many small
tensor ops then slow down by an order of magnitude (13.5 s vs 0.38 s for one
VED call of 8 prompts on the synthetic setup, 2 threads vs 1, 2-core box at
load 5), so single-thread figures are the comparable ones.
"""

from __future__ import annotations

import copy
import random
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import load_checkpoint
from models.policy import Policy
from models.sid_catalog import Item, SidCatalog, level_token
from models.value_head import value_head_for
from models.ved_config import resolve_budget
from training.bench.timing import interleaved_ms
from training.data.dataset import RecDataset, Sample, check_catalog
from training.rl.config import RLConfig, rollout_ved_config
from training.rl.trainer import RLTrainer


def synthetic_dataset(num_items: int = 1000, codes: tuple[int, int, int] = (32, 16, 16), seed: int = 0) -> RecDataset:
    """Random catalog, random histories (1-10 items) and random unit embeddings, in memory."""
    rng = random.Random(seed)
    items = {
        i: Item(i, "", tuple(level_token(lv, rng.randrange(c)) for lv, c in enumerate(codes))) for i in range(num_items)
    }
    catalog = SidCatalog(items)
    ids = sorted(items)
    rows = [
        Sample(f"u{u}", tuple(rng.choice(ids) for _ in range(rng.randrange(1, 11))), rng.choice(ids))
        for u in range(256)
    ]
    emb = np.random.default_rng(seed).normal(size=(num_items, 64)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return RecDataset("synthetic", catalog, {"train": rows, "valid": [], "test": []}, emb)


def clone(policy: Policy) -> Policy:
    return Policy(copy.deepcopy(policy.model), policy.tokenizer, policy.catalog, policy.prompt)


def make_trainer(policy: Policy, config: RLConfig, item_emb: np.ndarray | None, steps: int) -> RLTrainer:
    """A trainer of ``steps`` steps and a warm-up on copies of ``policy`` (its policy and frozen reference)."""
    trainer_policy = clone(policy)
    head = value_head_for(trainer_policy) if config.use_value else None
    return RLTrainer(trainer_policy, clone(policy), config, steps + 1, head, item_emb)


def time_trainers(trainers: dict[str, RLTrainer], samples: list[Sample], steps: int) -> dict[str, float]:
    """Each trainer's mean seconds per step over ``steps`` rounds of one step of each, after a warm-up step each."""
    for trainer in trainers.values():
        trainer.step(samples)
    runs = {name: partial(trainer.step, samples) for name, trainer in trainers.items()}
    device = next(iter(trainers.values())).policy.device
    return {name: float(np.mean(ms)) / 1000 for name, ms in interleaved_ms(runs, steps, device).items()}


def run_train_bench(
    data: RecDataset | None,
    checkpoint: Path | None,
    preset: str,
    batch_size: int,
    steps: int,
    budget: int | None,
    device: str,
) -> dict[str, float]:
    torch.manual_seed(0)
    ds = data or synthetic_dataset()
    vstar_config = RLConfig(algo="vstar", batch_size=batch_size, ved_config=rollout_ved_config(budget))
    resolve_budget(vstar_config.ved_config, ds.catalog.depth)  # one the initial tree cannot fit: before any work
    if checkpoint is not None:
        policy = load_checkpoint(checkpoint, device).policy
        check_catalog(policy.catalog, ds, "--checkpoint")
    else:
        policy = Policy.from_preset(preset, ds.catalog, seed=0).to(device)
    samples = list(ds.splits["train"][:batch_size])
    trainers = {
        "grpo": make_trainer(policy, RLConfig(algo="grpo", batch_size=batch_size), ds.embeddings, steps),
        "vstar": make_trainer(policy, vstar_config, ds.embeddings, steps),
    }
    seconds = time_trainers(trainers, samples, steps)
    grpo, vstar = seconds["grpo"], seconds["vstar"]
    print(
        f"bench train: {len(samples)} prompts x {vstar_config.num_candidates} candidates, {steps} steps, "
        f"{torch.get_num_threads()} threads; "
        f"V-STAR / GRPO = {vstar / grpo:.2f}x",
        file=sys.stderr,
    )
    return {"grpo_s_per_step": round(grpo, 4), "vstar_s_per_step": round(vstar, 4)}
