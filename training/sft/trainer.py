"""Supervised fine-tuning: next-item SID prediction, loss on the target tokens only.

Design decisions:

* AdamW with linear warm-up then cosine decay; fp32 on CPU, bf16 autocast on
  GPUs that support it.
* Batches are drawn from a seeded permutation per epoch and sorted by length
  inside small chunks (less padding, still shuffled); ``--seed`` fixes both the
  initial weights and the order, so a run is deterministic on one machine.
* Model selection: HR@10 (ties: NDCG@10) by constrained beam search on the
  validation rows, after every epoch (or every ``eval_every`` steps). When the
  valid split is itself trained on (``--train-splits train,valid``), the last
  ``holdout`` rows of valid (the most recent ones) are held out of training and
  used for selection instead; test is never looked at.
* ``--holdout 0`` trains on all of valid and keeps the last model: the refit,
  once the configuration and epoch count were chosen on a held-out run.
  ``--refit`` (on in the small recipe) runs both in one command: the held-out
  run at ``<out>.heldout`` chooses the fusion weight, then the same
  configuration is trained from scratch on all of train + valid with that
  weight. The most recent valid rows are the closest to what is recommended
  next; a model that never saw them loses about 7% HR@10 on test (README).
* Regularisers for this small-data regime, each a forward hook so checkpoints
  are unchanged: dropout on the input embeddings and residual dropout on every
  layer's attention and MLP outputs (Qwen2 has attention dropout only), plus
  history cropping. ``--item-tokens`` adds a whole-SID token per history item
  to the prompt (``models.sid_tokenizer``).
* The configuration (``SFTConfig``, the presets' recipes) lives in
  ``training.sft.config``, which imports nothing heavy, so the CLI checks it
  before torch loads. Batches are ``training.sft.batches``, the regularisers
  ``training.sft.regularisers``; the loop, resume and checkpoints are
  ``training.loop``, shared with the RL stage.
* Curves: loss and learning rate every step, the held-out HR@10 / NDCG@10 at
  each validation, as TensorBoard scalars (``training.scalar_log``).
* The best model goes to ``--out``; the latest state (weights, optimizer,
  scheduler, position in the data) to ``<out>.resume`` after each validation,
  so ``--resume`` continues an interrupted run. Both writes are atomic. A
  finished held-out run is taken by ``--resume`` only when it trained on the
  same data with the same configuration, as a ``.resume`` folder is, and is
  reported as it reported itself: its summary's figures are stored in its
  manifest (``run``) with its fusion choice. A fresh
  run first clears an earlier run's side files (``training.run_files``), once
  its checks on the data have passed.
* Under ``torchrun`` / ``accelerate launch`` (``training.distributed``): DDP,
  ``--batch-size`` is the global batch (each rank trains on its slice, the loss
  weighted by the rank's share of target tokens, so the gradient is the global
  batch's), validation is sharded over the ranks, rank 0 alone writes, and each
  rank draws its own dropout masks. History crops are drawn over the global
  batch, as one process draws them. With the same global batch and no dropout,
  N processes give the parameters of one up to float rounding.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from models.policy import Policy
from training.data.dataset import (
    RecDataset,
    popular_sids,
    split_for_training,
    training_rows,
    warn_if_nothing_selects,
)
from training.distributed import (
    Shard,
    fork_rng,
    global_mean,
    is_main,
    loss_scales,
    require_global_batch,
    wrap_ddp,
)
from training.evaluation.fusion import FUSION_BEAMS, FUSION_WEIGHTS, fusable_checkpoint, fuse_trained, require_held_out
from training.loop import (
    RESTART,
    Checkpointer,
    Diverged,
    Schedule,
    TrainState,
    differences,
    load_resume,
    require_kept,
    require_same_data,
    run_steps,
)
from training.optim import (
    autocast_dtype,
    cosine_schedule,
    flush_denormals,
    restore_rng_state,
    rng_state,
    seed_everything,
)
from training.run_files import clear_side_files, earlier_run, heldout_curves, heldout_folder, resume_folder
from training.scalar_log import ScalarLog
from training.sft.batches import collate, crop_histories, encode_sample
from training.sft.config import SFTConfig, base_model_problem
from training.sft.regularisers import WeightAverage
from training.sft.starting_model import fresh_policy, text_embeddings, with_dropout

log = logging.getLogger(__name__)


def train_sft(
    data: RecDataset,
    out: str | Path,
    config: SFTConfig,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
    tensorboard: Path | None = None,
) -> dict[str, Any]:
    """Train, keep the best checkpoint at ``out``; returns a summary. Curves go to ``tensorboard`` if given.

    With ``config.refits`` this is two runs: the held-out run at ``<out>.heldout`` (selection and the
    fusion weight, as without ``refit``), then the same configuration from scratch on all of train +
    valid (``holdout`` 0, that weight, last model kept) at ``out``. ``resume`` continues whichever
    run was interrupted; a finished held-out run (its fusion chosen) is not run again. Without ``resume``
    an earlier run's side files at ``out`` are cleared first (``start_fresh``).
    """
    out = Path(out)
    if is_main():
        warn_if_nothing_selects(data, config)  # once: the held-out run and the refit read the rows again
    with flush_denormals():
        built = None  # a new run's model, built before anything is cleared (``start_fresh``)
        if resume and earlier_run(out) is None:  # with --refit it would start afresh without a word
            raise ValueError(f"--resume: no interrupted run at {out}")
        if not resume:
            built = start_fresh(data, out, config, device)
        if not config.refits or not split_for_training(data, config)[1]:
            # an empty valid.csv holds nothing out (warned above): a held-out run and its refit would be the same
            # run twice, so there is one, its last model kept
            return _train_sft(data, out, config, device, resume, progress, tensorboard, policy=built)
        heldout_out = heldout_folder(out)
        heldout_tb = heldout_curves(tensorboard) if tensorboard else None
        chosen = finished_heldout_run(heldout_out, config, data) if resume else None
        if chosen is None:
            again = resume and resume_folder(heldout_out).exists()
            chosen = _train_sft(data, heldout_out, config, device, again, progress, heldout_tb, resume, built)
            built = None  # that run's model, trained: freed before the refit builds its own (not two models at once)
        else:
            log.info("--resume: the held-out run at %s has finished", heldout_out)
        refit = replace(config, holdout=0, fusion_weight=chosen["fusion"]["weight"])
        log.info("refit on all of train + valid with fusion weight %g", refit.fusion_weight)
        again = resume and resume_folder(out).exists()
        summary = _train_sft(data, out, refit, device, again, progress, tensorboard, resume, given_by="held-out run")
        return summary | {"heldout_run": {"checkpoint": str(heldout_out)} | chosen}


def start_fresh(data: RecDataset, out: Path, config: SFTConfig, device: str) -> Policy:
    """Before a new run at ``out``: the checks that need the data, and the run's model built (seeded as the
    run seeds it), then an earlier run's side files cleared (``training.run_files``), so that a mistake found
    here (a pretrained LM that does not load, dropout its layers cannot take) loses nothing and nothing old
    mixes with the new. Returns the model for the (first) run."""
    require_global_batch(config.batch_size)
    problem = base_model_problem(config.base_model) if config.base_model else None
    if problem is not None:
        raise ValueError(problem)
    training_rows(data, config)
    if config.text_init:
        text_embeddings(data)
    seed_everything(config.seed)
    policy = fresh_policy(data, config, device)
    if is_main():
        clear_side_files(out)
    return policy


def finished_heldout_run(path: Path, config: SFTConfig, data: RecDataset) -> dict[str, Any] | None:
    """The summary of a finished held-out run at ``path`` as the run returned it, from its manifest's ``run``
    and ``fusion``; None if it has not finished (or finished without recording its figures: ``--resume``
    then continues it from its last state, which only fuses it again). A ``ValueError``, as
    ``load_resume``'s, when it trained on other data or with another configuration: the refit would take
    its fusion weight."""
    if not (path / "manifest.json").is_file():
        return None
    manifest = json.loads((path / "manifest.json").read_text())
    if "fusion" not in manifest or "run" not in manifest:  # the run's figures and fusion are its last write
        return None
    require_same_data(path, manifest, data)
    changed = differences(manifest.get("sft_config"), asdict(config))
    if changed:
        raise ValueError(
            f"--resume: the finished held-out run at {path} was written with a different configuration "
            f"({'; '.join(changed)}){RESTART}"
        )
    return manifest["run"] | {"fusion": manifest["fusion"]}


def _train_sft(
    data: RecDataset,
    out: str | Path,
    config: SFTConfig,
    device: str,
    resume: bool,
    progress: bool,
    tensorboard: Path | None,
    restarted: bool = False,
    policy: Policy | None = None,
    given_by: str = "given",
) -> dict[str, Any]:
    """One run at ``out``. ``restarted``: under ``--resume``, so that ``tensorboard`` holds this run's own curves
    from an interrupted attempt; a run that starts over (interrupted before its first validation wrote a resume
    state) purges them, as a resumed one purges those past its resume point. ``policy``: a new run's model,
    built (``fresh_policy``) right after ``seed_everything(config.seed)`` with nothing drawn since.
    ``given_by``: where ``config.fusion_weight``, when set, came from (manifest ``fusion.chosen_by``)."""
    out = Path(out)
    require_global_batch(config.batch_size)
    if policy is None:
        seed_everything(config.seed)
    train_rows, held_out = training_rows(data, config)
    select_rows = held_out[: config.eval_limit]

    trainer_state = None
    if resume:
        loaded, trainer_state = load_resume(resume_folder(out), device, {"config": asdict(config)}, data)
        policy = with_dropout(loaded.policy, config)
    elif policy is None:
        policy = fresh_policy(data, config, device)
    encoded = [encode_sample(policy, s) for s in train_rows]
    steps_per_epoch = math.ceil(len(encoded) / config.batch_size)
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    model = policy.model
    train_model = wrap_ddp(model)  # DDP when distributed; the same parameters as ``model``
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = cosine_schedule(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    state = TrainState()
    if trainer_state is not None:
        optimizer.load_state_dict(trainer_state["optimizer"])
        scheduler.load_state_dict(trainer_state["scheduler"])
        state = TrainState(**trainer_state["train_state"])
        require_kept(out, state)
        restore_rng_state(trainer_state, policy.device)  # the GPU's generator too: dropout draws there
    ema = WeightAverage(model, config.ema) if config.ema > 0 else None
    if ema is not None and trainer_state is not None:
        ema.load_state_dict(trainer_state["ema"])
    curves = ScalarLog(tensorboard, state.step if trainer_state is not None or restarted else None)
    amp = autocast_dtype(policy.device, config.precision)
    manifest = {
        "stage": "sft",
        "sft_config": asdict(config),
        "data": data.identity() | {"train_rows": len(train_rows)},
        "popular_sids": popular_sids(data.catalog, train_rows),
    }
    checkpointer = Checkpointer(policy, out, manifest, select_rows, train_rows, config.eval_beams)
    log.info(
        "SFT config %s; %d training rows, %d selection rows, %d steps",
        asdict(config),
        len(encoded),
        len(select_rows),
        total_steps,
    )
    cut = sum(len(s.history) > config.max_history for s in train_rows)
    if cut:  # the prompt holds the most recent items only (as served): say how much history that leaves out
        log.info(
            "%d of %d training rows have more than %d history items: their prompts hold the most recent %d "
            "(--max-history)", cut, len(train_rows), config.max_history, config.max_history,
        )  # fmt: skip

    def train_step(part: Shard) -> dict[str, float]:
        # distributed: this step's dropout masks from (seed, rank, step), so that a resumed run draws what the
        # uninterrupted one drew (the resume state holds rank 0's RNG alone); one process: a no-op
        fork_rng(config.seed, state.step)
        rows = [encoded[i] for i in part.rows]  # this rank's slice of the global batch
        if config.crop_prob > 0 or config.last_item_prob > 0:
            rows = crop_histories(
                policy,
                train_rows,
                part.batch,
                rows,
                config.crop_prob,
                (config.seed, state.step),
                config.last_item_prob,
                part.start,
            )
        batch = {k: v.to(policy.device) for k, v in collate(rows, int(policy.tokenizer.pad_token_id)).items()}
        with torch.autocast(policy.device.type, dtype=amp, enabled=amp is not None):
            loss = train_model(**batch).loss  # mean over this shard's target tokens
        tokens = sum(len(t) for _, t in rows) if part.counted else 0  # this shard's target tokens
        (scale,) = loss_scales([tokens])  # 1.0 in one process
        optimizer.zero_grad(set_to_none=True)
        (loss * scale).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        lr = scheduler.get_last_lr()[0]  # this step's
        scheduler.step()
        if ema is not None:
            ema.update()
        # the curve's loss is the global batch's (a rank's own is over its slice only); one process: loss.item()
        return {"train/loss": global_mean(loss.item(), tokens), "train/lr": float(lr)}

    bar = tqdm(total=total_steps, initial=state.step, desc="sft", disable=not progress or not is_main())

    def report(stats: dict[str, float]) -> None:
        curves.add(state.step, stats)
        bar.set_postfix(loss=f"{stats['train/loss']:.3f}", epoch=state.epoch, refresh=False)
        bar.update(1)

    last_validated = state.step if resume else -1

    def validate() -> None:
        nonlocal last_validated
        if len(select_rows):  # the bar stands still meanwhile: say why
            bar.set_postfix_str(f"validating on {len(select_rows)} held-out rows", refresh=True)
        checkpointer.validate(state, lambda: {
            "config": asdict(config),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "train_state": asdict(state),
        } | rng_state(policy.device) | ({"ema": ema.state_dict()} if ema is not None else {}),
        averaged=ema.swapped_in if ema is not None else nullcontext)  # fmt: skip
        curves.validated(state.step, state.history[-1])
        last_validated = state.step
        model.train()

    start, start_step = time.perf_counter(), state.step
    model.train()
    schedule = Schedule([len(p) + len(t) for p, t in encoded], config.batch_size, config.seed, total_steps,
                        config.eval_every or steps_per_epoch)  # fmt: skip
    diverged = Diverged(("train/loss",), f"--lr than {config.lr:g}", out, state)
    run_steps(state, schedule, train_step, report, validate, diverged)
    bar.close()
    if last_validated != state.step:
        validate()
    curves.close()
    trained, ran = time.perf_counter() - start, state.step - start_step  # this process's steps: a resume's own
    run = {
        "best": {"HR@10": state.best[0], "NDCG@10": state.best[1]} if select_rows else None,  # None: a refit
        "steps": state.step,
        "steps_per_epoch": steps_per_epoch,
        "seconds": round(trained, 1),  # stored: until the fusion; returned: to the end
        # an epoch's steps with their validations, timed over the steps this process ran (None: it ran none)
        "seconds_per_epoch": round(trained * steps_per_epoch / ran, 1) if ran else None,
        "history": state.history,
        "train_rows": len(train_rows),
        "selection_rows": len(select_rows),
    }
    # the kept model's fusion with the transition counts (training.evaluation.fusion: each rank scores its
    # slice of the held-out rows, rank 0 writes; every rank gets the same choice, which a --refit trains on),
    # and the run's figures in the same write: a resumed refit reports its finished held-out run from them
    device = str(policy.device)
    fusion = fuse_trained(
        out, config.fusion_weight, train_rows, held_out, config.eval_limit, device, run=run, progress=progress,
        given_by=given_by,
    )  # fmt: skip
    return run | {"seconds": round(time.perf_counter() - start, 1), "fusion": fusion}


def fuse_checkpoint(
    path: str | Path,
    data: RecDataset,
    weights: Sequence[float] = FUSION_WEIGHTS,
    beams: int = FUSION_BEAMS,
    device: str = "cpu",
) -> dict[str, Any]:
    """``vstar fuse`` on an SFT checkpoint: what SFT does when it ends, for a checkpoint written without it.
    A refit (nothing held out) is refused and keeps its weight; RL checkpoints: ``training.rl.rows``."""
    path = Path(path)
    checkpoint = fusable_checkpoint(path, data, "sft", device)
    manifest = checkpoint.manifest
    stored = dict(manifest["sft_config"])
    config = SFTConfig(**(stored | {"train_splits": tuple(stored["train_splits"])}))
    train_rows, held_out = split_for_training(data, config)
    require_held_out(path, manifest, held_out, config.holdout, "a refit: --holdout 0")  # its weight: its held-out run
    fusion = fuse_trained(
        path,
        None,  # vstar fuse chooses on the grid, whatever weight the run was given (RL's fuse does the same)
        train_rows,
        held_out,
        config.eval_limit,
        device,
        weights,
        beams,
        checkpoint,
        progress=True,
    )
    return {"checkpoint": str(path)} | fusion
