"""Running the RL stage: data, resume, validation, checkpoints around ``RLTrainer.step``.

* Prompts are the training rows in seeded, length-bucketed batches
  (``training.loop``, as SFT's); ``--seed`` fixes the order and VED's draws.
* Every step's figures go to ``<out>.steps.jsonl`` (reward mean, non-zero
  advantage share, within-group reward std, distinct candidates, reachability,
  value loss, tokens spent, losses, KL, seconds) and to TensorBoard with the
  held-out scores (``training.scalar_log``), every ``LOG_EVERY`` steps to the
  log, every step to the tqdm bar.
* Selection: HR@10 (ties NDCG@10) by beam search on valid (the held-out valid
  rows when valid is trained on) every ``eval_every`` steps and at the end; the
  best goes to ``--out`` (policy + value head extra + manifest). The init
  model's score is recorded as step 0 and never selected; test is never read.
  When no RL step beats it, the run says so (a warning, and ``below_init``
  in the summary): the RL result is then the best RL model, not a better one.
* A run whose training rows its SFT ``--init`` trained on (the recipe's refit
  on train + valid, or any SFT model with ``--train-splits train``; for an RL
  ``--init``, the SFT model it descends from, ``rows.root_sft_config``) is warned
  at the start, with ``init_trained_on_train_rows`` in the summary: on
  amazon-industrial RL on rows SFT had fitted moved nothing, and paid on rows
  it never saw (README, "RL").
* ``<out>.resume`` holds the latest state (weights, value head, both
  optimizers, scheduler, position in the data, RNG, each step's seconds for
  ``s_per_step`` and ``step_seconds``) after each validation; ``--resume``
  continues from it. The summary's ``seconds`` is this command's wall time, so
  after a ``--resume`` the resumed part's; ``step_seconds``, the seconds of every
  step the run kept, and ``s_per_step`` cover the whole run. The
  value warm-up's figures are in the manifests (``value_warmup``), so a
  resumed run reports the warm-up it does not run again. All writes are
  atomic (``save_checkpoint``).
  A fresh run clears an earlier run's side files (``training.run_files``) once
  its checks have passed; the old ``--out`` stays until the first save.
* Shallow fusion with the transition counts (``training.evaluation.fusion``): the kept
  model is fused at the ``--init`` checkpoint's weight (``--fusion-weight``
  overrides it), with counts of this run's training and held-out rows and,
  when it trains on valid alone (SFT on train, RL on the rows SFT never saw),
  of the train split too: every row before test, as SFT's counts;
  ``vstar eval`` decodes with both. The weight is not chosen again on the
  held-out rows by default: an SFT refit has trained on them, so they would
  flatter the policy and choose too small a weight. An init without a chosen
  weight (nothing held out, fusion never chosen) gets one chosen on the
  held-out rows here, as SFT chooses it. ``vstar fuse`` chooses one for a
  finished run (``fuse_rl_checkpoint``), when its init's rows are clean.
* ``--fused-rollouts``: the rollouts (beam search, or VED's initial tree and
  returned set) are fused at that same weight with counts of ``counted_rows`` (``training.rl.rows``)
  less the held-out rows, so the groups are drawn and ranked as the result is
  served. Those counts include the training rows, so each row's own
  transition is taken back while it decodes (``models.transition``): its target
  scores only what the other rows gave it.
* Under ``torchrun`` / ``accelerate launch`` (``training.distributed``):
  ``--batch-size`` prompts is the global batch; each rank rolls out, rewards and
  computes advantages for its slice (groups never straddle ranks, so this is
  exact), DDP averages the scaled gradients of the policy and of V_phi, the
  step figures are prompt-weighted means over the ranks (``seconds``: the
  slowest rank), validation is sharded, and rank 0 alone writes files.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models.atomic_folder import write_file
from models.checkpoint import content_digest, load_checkpoint
from models.value_head import ValueHead, load_value_head, value_head_for, value_head_manifest
from models.ved_config import resolve_budget
from training.data.dataset import (
    RecDataset,
    Sample,
    check_catalog,
    popular_sids,
    training_rows,
    warn_if_nothing_selects,
)
from training.distributed import Shard, is_main, require_global_batch, shard, weighted_mean
from training.evaluation.fusion import fuse_trained
from training.loop import (
    RESTART,
    Checkpointer,
    Diverged,
    Schedule,
    TrainState,
    carry_external_ids,
    epoch_batches,
    load_resume,
    require_kept,
    run_steps,
)
from training.optim import seed_everything
from training.rl.config import RLConfig
from training.rl.rewards import resolve_level_weights
from training.rl.rows import counted_rows, fused_rollouts, result_fusion_weight, root_sft_config, sft_trained_on
from training.rl.trainer import RLTrainer
from training.run_files import clear_side_files, resume_folder
from training.run_files import steps_file as steps_log
from training.scalar_log import ScalarLog

log = logging.getLogger(__name__)
LOG_EVERY = 10  # steps between log lines
LOGGED = (
    "reward_mean", "nonzero_adv_share", "reward_std", "distinct", "reachability", "value_loss", "tokens_per_prompt",
    "kl", "seconds",
)  # fmt: skip


SUMMED = ("sibling_tokens",)  # step figures that count over the batch (the others are means): summed over ranks


def warm_up_value(
    trainer: RLTrainer, train_rows: list[Sample], lengths: list[int], config: RLConfig, progress: bool
) -> dict[str, float]:
    """``config.value_warmup`` TD-only steps of the value head on the training rows (``value_warmup_step``),
    in the order of the RL epochs' batches; returns the steps, seconds and the last logged value loss."""
    start = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(total=config.value_warmup, desc="value warm-up", disable=not progress or not is_main())
    epoch = 0
    while len(losses) < config.value_warmup:
        for batch in epoch_batches(lengths, config.batch_size, config.seed, epoch):
            part = shard(batch)
            stats = trainer.value_warmup_step([train_rows[i] for i in part.rows], counted=part.counted)
            losses.append(weighted_mean(stats, len(part.rows) if part.counted else 0)["value_loss"])
            bar.update(1)
            if len(losses) % LOG_EVERY == 0:
                log.info("value warm-up step %d: value_loss %.4g", len(losses), np.mean(losses[-LOG_EVERY:]))
            if len(losses) >= config.value_warmup:
                break
        epoch += 1
    bar.close()
    tail = losses[-LOG_EVERY:]
    return {"steps": len(losses), "seconds": round(time.perf_counter() - start, 1), "value_loss": float(np.mean(tail))}


def step_records(steps_file: Path) -> list[tuple[str, int]]:
    """(line, step) of each record in ``<out>.steps.jsonl``, for ``--resume`` to keep those up to its state.

    A last line cut short (no newline at its end: the run was killed while writing it) is dropped with a
    warning; a malformed line anywhere else is a ``ValueError`` naming the file and the line.
    """
    if not steps_file.exists():
        return []
    text = steps_file.read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            records.append((line, int(record["step"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            if number == len(lines) and not text.endswith("\n"):
                log.warning("%s:%d: dropping the last line, cut short (the run was stopped while writing it)",
                            steps_file, number)  # fmt: skip
                break
            raise ValueError(
                f"{steps_file}:{number}: not a step record ({type(e).__name__}: {e}); fix or remove that line "
                "to --resume"
            ) from None
    return records


def warn_fitted_rows(init: str | Path, fitted: int, rows: int) -> None:
    """A warning that RL trains on rows its SFT ``init`` already fitted: where RL paid in the measurements of
    docs/rl-experiments.md, and how to get there."""
    log.warning(
        "the --init checkpoint %s trained on %d of this run's %d training rows: RL on rows the SFT model had "
        "fitted moved nothing on amazon-industrial (docs/rl-experiments.md, rounds 1 and 2); it beat its init on "
        "rows SFT never saw (vstar sft --train-splits train --no-refit, then vstar rl --train-splits valid), though "
        "fused with the counts it ended level with the SFT recipe's refit on train + valid", init, fitted, rows,
    )  # fmt: skip


def require_same_init(trainer_state: dict[str, Any], init: str | Path, version: str, digest: Callable[[], str]) -> None:
    """At ``--resume``: ``--init`` (model ``version``, content ``digest()``) is the checkpoint the run began from,
    whatever path names it now: the same write (its version), or a rewrite of the same weights, counts and fusion
    weight (a finished SFT run resumed rewrites it under a new version). States written before the digest was
    kept are matched by version, those before the version by the path as given."""
    was_version, was_digest = trainer_state.get("init_version"), trainer_state.get("init_digest")
    if was_version is None:
        if trainer_state.get("init") != str(init):
            raise ValueError(
                f"--resume: the run began from another --init (init ({trainer_state.get('init')!r} there, "
                f"{str(init)!r} now)){RESTART}"
            )
        return
    if was_version == version or (was_digest is not None and was_digest == digest()):
        return
    raise ValueError(
        f"--resume: the --init checkpoint {init} is not the one the run began from (model version {was_version} "
        f"then, {version} now{', and other weights, counts or fusion weight' if was_digest else ''}), so the "
        "reference model and the counts would change mid-run: put the original back, or start again with --force"
    )


def train_rl(
    data: RecDataset,
    init: str | Path,
    out: str | Path,
    config: RLConfig,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
    tensorboard: Path | None = None,
    precision: str = "auto",
) -> dict[str, Any]:
    """RL from the ``init`` checkpoint; the best model by validation goes to ``out``. Returns a summary.
    Curves go to ``tensorboard`` if given. ``precision``: the autocast of the forwards (``auto``: bf16 on a GPU
    that runs it natively); like the device, not part of the run's identity, so a resume may change it."""
    out = Path(out)
    steps_file = steps_log(out)
    require_global_batch(config.batch_size)
    seed_everything(config.seed)
    if config.use_value and config.dense:  # the weights the run uses, in its manifest and resume identity
        config = replace(config, level_weights=resolve_level_weights(config.level_weights, data.catalog.depth))
    if config.use_ved:  # a budget the initial tree cannot fit stops the run here, before it writes anything
        resolve_budget(config.ved_config, data.catalog.depth)
    train_rows, held_out = training_rows(data, config)
    if is_main():
        warn_if_nothing_selects(data, config)
    select_rows = held_out[: config.eval_limit]
    start_ckpt = load_checkpoint(init, device)
    check_catalog(start_ckpt.policy.catalog, data, "--init")
    carry_external_ids(start_ckpt.policy, data)
    fitted = sft_trained_on(root_sft_config(start_ckpt.manifest), data, train_rows)  # the init's SFT, read once
    if fitted and is_main():
        warn_fitted_rows(init, fitted, len(train_rows))
    reference_ckpt = load_checkpoint(init, device)
    reference, reference_version = reference_ckpt.policy, reference_ckpt.model_version
    # read only where needed (a resume whose init was rewritten; rank 0's first state): an init may be gigabytes
    init_digest = functools.cache(lambda: content_digest(init))
    trainer_state = None
    if resume:
        start_ckpt, trainer_state = load_resume(
            resume_folder(out), device, {"config": asdict(config)}, data, "a different configuration", wanted="rl"
        )
        require_same_init(trainer_state, init, reference_version, init_digest)
    policy = start_ckpt.policy
    value_head: ValueHead | None = None
    if config.use_value:
        value_head = load_value_head(start_ckpt, device, required=False)
        if value_head is None:  # an SFT init: V_phi starts fresh
            value_head = value_head_for(policy)
    total_steps = config.max_steps or math.ceil(len(train_rows) / config.batch_size) * config.epochs
    rollout_fusion = fused_rollouts(data, init, config, train_rows) if config.fused_rollouts else None
    trainer = RLTrainer(policy, reference, config, total_steps, value_head, data.embeddings, rollout_fusion, precision)
    state = TrainState()
    if trainer_state is not None:
        trainer.load_state_dict(trainer_state["trainer"])
        state = TrainState(**trainer_state["state"])
        require_kept(out, state)
        torch.set_rng_state(trainer_state["torch_rng"])
        if is_main():
            kept = [line for line, step in step_records(steps_file) if step <= state.step]
            # in one step: a resume killed mid-write must not leave the steps before it lost
            write_file(steps_file, "".join(line + "\n" for line in kept).encode())
    elif is_main():  # a fresh run, its checks passed: nothing of an earlier run at ``out`` mixes in
        clear_side_files(out)
    curves = ScalarLog(tensorboard, state.step if trainer_state is not None else None)
    log.info(
        "RL config %s (%s); %d training rows, %d selection rows, %d steps",
        asdict(config),
        config.parts_in_use(),
        len(train_rows),
        len(select_rows),
        total_steps,
    )
    lengths = [len(s.history) for s in train_rows]
    if trainer_state is not None:  # the warm-up ran before the interruption: its figures are in the manifest
        warmup = start_ckpt.manifest.get("value_warmup", {})  # {}: a state written before they were recorded
    elif config.use_value and config.value_warmup:
        warmup = warm_up_value(trainer, train_rows, lengths, config, progress)
    else:
        warmup = {}
    manifest: dict[str, Any] = {
        "stage": "rl",
        "rl_config": asdict(config),
        "init": str(init),
        "data": data.identity() | {"train_rows": len(train_rows)},
        # the service's fallback: the targets of every row the fused counts hold before the held-out ones (RL on
        # valid alone keeps train's, as its counts do)
        "popular_sids": popular_sids(data.catalog, counted_rows(data, config, train_rows)),
        "value_warmup": warmup,
        # the weight the rollouts were fused at (--fused-rollouts), kept when vstar fuse changes ``fusion``:
        # vstar diagnose decodes as they were (``training.rl.rows.rollout_fusion``)
        "rollout_fusion_weight": None if rollout_fusion is None else rollout_fusion.weight,
    }
    if value_head is not None:
        manifest["value_head"] = value_head_manifest(value_head)
    checkpointer = Checkpointer(policy, out, manifest, select_rows, train_rows, config.eval_beams)
    # each step's seconds, those before an interruption included: s_per_step is over every step of the run
    # ([] from a resume state written before they were kept)
    seconds: list[float] = list(trainer_state.get("step_seconds", [])) if trainer_state is not None else []

    bar = tqdm(total=total_steps, initial=state.step, desc=f"rl {config.algo}", disable=not progress or not is_main())

    def validate() -> None:
        if select_rows:  # the bar stands still meanwhile: say why
            bar.set_postfix_str(f"validating on {len(select_rows)} held-out rows", refresh=True)
        extras = {"value_head": value_head.state_dict()} if value_head is not None else {}
        # step 0 scores the SFT model for the log; it is never selected as the RL result
        checkpointer.validate(state, lambda: {
            "config": asdict(config),
            "init": str(init),
            "init_version": reference_version,
            "init_digest": init_digest(),
            "trainer": trainer.state_dict(),
            "state": asdict(state),
            "torch_rng": torch.get_rng_state(),
            "step_seconds": seconds,
        }, extras, selectable=state.step > 0)  # fmt: skip
        curves.validated(state.step, state.history[-1])

    if trainer_state is None:
        validate()

    def train_step(part: Shard) -> dict[str, float]:
        samples = [train_rows[i] for i in part.rows]  # this rank's prompts of the global batch
        # a stand-in shard (an empty slice of a short last batch) trains with weight 0
        stats = trainer.step(samples) if part.counted else trainer.step(samples, counted=False)
        # sibling_tokens is a count over the batch: summed, as one process counts it over the whole batch
        return weighted_mean(stats, len(part.rows) if part.counted else 0, maxed=("seconds",), summed=SUMMED)

    start = time.perf_counter()

    def report(stats: dict[str, float]) -> None:
        seconds.append(stats["seconds"])
        if is_main():
            with steps_file.open("a") as f:
                f.write(json.dumps({"step": state.step, "epoch": state.epoch} | stats) + "\n")
        curves.add(state.step, {f"{'train' if k in ('loss', 'lr') else 'rl'}/{k}": v for k, v in stats.items()})
        postfix = {
            "reach": f"{stats['reachability']:.2f}",
            "std": f"{stats['reward_std']:.3f}",
            "kl": f"{stats['kl']:.4f}",
        }
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if state.step % LOG_EVERY == 0:
            log.info("step %d: %s", state.step, " ".join(f"{k} {stats[k]:.4g}" for k in LOGGED))

    losses = ("grpo_loss", "sibling_loss", "kl") + (("value_loss",) if value_head is not None else ())
    lrs = f"--lr than {config.lr:g}" + (f" (or --value-lr than {config.value_lr:g})" if value_head is not None else "")
    run_steps(state, Schedule(lengths, config.batch_size, config.seed, total_steps, config.eval_every),
              train_step, report, validate, Diverged(losses, lrs, out, state))  # fmt: skip
    bar.close()
    curves.close()
    init_score = next(((h["HR@10"], h["NDCG@10"]) for h in state.history if h["step"] == 0 and "HR@10" in h), None)
    below_init = init_score is not None and state.best < init_score
    if below_init and is_main():
        log.warning(
            "no RL step beat the init on the %d selection rows (HR@10, NDCG@10: best step %.4f, %.4f; init %s): "
            "%s is the best RL model, and the init %s may serve better", len(select_rows), *state.best,
            ", ".join(f"{v:.4f}" for v in init_score or ()), out, init,
        )  # fmt: skip
    # the kept model's fusion with the transition counts (each rank scores its slice of the held-out rows when
    # the weight is chosen here; rank 0 writes)
    weight = result_fusion_weight(init, config)
    given_by = "given" if config.fusion_weight is not None else "init"
    counted = counted_rows(data, config, train_rows)
    fusion = fuse_trained(out, weight, counted, held_out, config.eval_limit, device, given_by=given_by)
    return {
        # None: nothing held out (--holdout 0 with valid trained on), the last model kept, as SFT says it
        "best": {"HR@10": state.best[0], "NDCG@10": state.best[1]} if select_rows else None,
        "below_init": below_init,  # the init scored higher on the selection rows than every RL step (logged)
        "steps": state.step,
        "seconds": round(time.perf_counter() - start, 1),  # this command's: a --resume's own part
        "step_seconds": round(float(np.sum(seconds)), 1),  # every step's of the run, those before a --resume too
        "s_per_step": round(float(np.mean(seconds)), 3) if seconds else None,
        "autocast": str(trainer.amp).removeprefix("torch.") if trainer.amp is not None else None,  # None: fp32
        "history": state.history,
        "steps_log": str(steps_file),
        "train_rows": len(train_rows),
        "init_trained_on_train_rows": fitted,  # None: no SFT config behind the init to tell (a link gone)
        "selection_rows": len(select_rows),
        "fusion": fusion,
        "value_warmup": warmup,
    }
