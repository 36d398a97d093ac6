"""The training loop SFT and RL share: data order, steps, resume, validation and checkpoints.

* ``epoch_batches``: a seeded permutation per epoch, sorted by length inside
  chunks of 32 batches (less padding, still shuffled); ``--seed`` fixes the order.
* ``run_steps``: the epoch loop. It walks the batches from where ``TrainState``
  says (so a resumed run continues mid-epoch), gives each step this rank's
  shard of the global batch (``training.distributed.shard``), counts the step,
  and validates every ``eval_every`` steps and at the last one. A step whose
  loss is nan or inf, or after which the model scores no SID (at the next
  rollout or validation: weights that overflowed with a finite loss), stops
  the run with a ``ValueError`` (``Diverged``) before anything more is saved.
* ``load_resume``: the ``<out>.resume`` folder of an interrupted run, refused
  when it was written by another configuration (its ``identity``) or trained
  on other data; the error names the settings that differ (``differences``).
  The folders' names are ``training.run_files``'. ``require_kept``: the model
  a resumed run kept at ``out`` must be there and whole before it trains on.
* ``carry_external_ids``: a run's checkpoints carry its data's external ids
  (item_map.json), whatever the checkpoint it resumes or starts from held.
* ``Checkpointer``: one validation: score the selection rows (HR@10, ties
  NDCG@10, by beam search), keep the best model at ``out`` and the latest
  state at ``<out>.resume``; rank 0 writes, all ranks wait. With no selection
  rows (a refit) the latest model is kept at ``out``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from models.checkpoint import (
    TRAINER_STATE,
    CheckpointError,
    LoadedCheckpoint,
    check_files,
    load_checkpoint,
    save_checkpoint,
)
from models.policy import Policy
from training.data.dataset import RecDataset, Sample
from training.distributed import Shard, barrier, is_main, shard
from training.evaluation.decoders import beam_decoder
from training.evaluation.evaluate import rank_samples, sharded_metrics
from training.run_files import resume_folder

log = logging.getLogger(__name__)
RESTART = ": resume with the options it was run with, or start again with --force"


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best: tuple[float, float] = (-1.0, -1.0)
    history: list[dict[str, Any]] = field(default_factory=list)

    def kept_a_model(self) -> bool:
        """Whether a validation of this run (before an interruption too) wrote the kept model at ``out``: a best
        score, or a validation with nothing held out (a refit's, which keeps the latest model, unscored) after
        step 0 (RL validates its init there and never keeps it: ``Checkpointer.validate``'s ``selectable``)."""
        return self.best[0] >= 0 or any("HR@10" not in h and h["step"] > 0 for h in self.history)


def require_kept(out: Path, state: TrainState) -> None:
    """At ``--resume``: the model the run kept at ``out`` is there and whole, when it kept one, before any step
    trains (the run reads it back at its end, and a later validation may never beat it to write it again)."""
    if not state.kept_a_model():
        return
    try:
        check_files(out)
    except CheckpointError as e:
        raise ValueError(
            f"--resume: the model this run kept is not whole ({e}); the run would train on and fail at its end: "
            "put the folder back, or start again with --force"
        ) from None


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    chunk = batch_size * 32
    batches: list[list[int]] = []
    for start in range(0, len(perm), chunk):
        part = sorted(perm[start : start + chunk].tolist(), key=lambda i: lengths[i])
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


@dataclass(frozen=True)
class Schedule:
    """How the loop walks the data: rows' lengths (for batching), global batch size, seed, steps, validations."""

    lengths: Sequence[int]
    batch_size: int
    seed: int
    total_steps: int
    eval_every: int


class NonFinite(ValueError):
    """Raised where a run sees that it has diverged (a loss, or a model that scores no SID): see ``Diverged``."""


@dataclass(frozen=True)
class Diverged:
    """How a run that diverged stops: the step figures that must stay finite (``keys``), the learning rates to
    lower (``lrs``, e.g. "--lr than 0.002"), and the run's ``out`` with its ``state``: ``out`` holds the model
    an earlier validation of this run kept, if one did (else an earlier run's, or nothing)."""

    keys: Sequence[str]
    lrs: str
    out: Path
    state: TrainState

    def check(self, stats: dict[str, float]) -> None:
        bad = [f"{k} {stats[k]}" for k in self.keys if k in stats and not math.isfinite(stats[k])]
        if bad:
            raise NonFinite(", ".join(bad))

    def fail(self, step: int, what: str) -> NoReturn:
        kept = self.state.kept_a_model()
        raise ValueError(
            f"training diverged at step {step} ({what}): start again with a lower {self.lrs} and --force "
            "(--resume would go on at the lr that diverged)"
            + (f"; {self.out} holds the model an earlier validation kept" if kept else "")
        )


def run_steps(
    state: TrainState,
    schedule: Schedule,
    train_step: Callable[[Shard], dict[str, float]],
    report: Callable[[dict[str, float]], None],
    validate: Callable[[], None],
    diverged: Diverged | None = None,
) -> None:
    """Steps until ``schedule.total_steps``: ``train_step`` on this rank's shard, the step counted in ``state``,
    ``report`` with the step's figures, then ``validate`` every ``eval_every`` steps and at the last one. With
    ``diverged``, a step whose loss is not finite (its figures are global: every rank stops), or whose step or
    validation raised ``NonFinite``, stops the run with its ``ValueError`` before anything more is written."""
    while state.step < schedule.total_steps:
        batches = epoch_batches(schedule.lengths, schedule.batch_size, schedule.seed, state.epoch)
        for bi in range(state.batch_in_epoch, len(batches)):
            step = state.step + 1
            try:
                stats = train_step(shard(batches[bi]))
                if diverged is not None:
                    diverged.check(stats)
                state.step, state.batch_in_epoch = step, bi + 1
                report(stats)
                if state.step % schedule.eval_every == 0 or state.step >= schedule.total_steps:
                    validate()
            except NonFinite as e:
                if diverged is None:
                    raise
                diverged.fail(step, str(e))
            if state.step >= schedule.total_steps:
                break
        if state.batch_in_epoch >= len(batches):
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0


def load_resume(
    folder: Path,
    device: str,
    identity: dict[str, Any],
    data: RecDataset,
    differs: str = "a different configuration",
    wanted: str = "sft",
) -> tuple[LoadedCheckpoint, dict[str, Any]]:
    """The interrupted run at ``folder`` and its trainer state; a ``ValueError`` when there is none, when it is
    another command's run (its manifest's stage is not ``wanted``), when it trained on other data than ``data``,
    or when its state does not hold ``identity`` (the configuration, and whatever else must match, key by key)."""
    if not folder.exists():
        raise ValueError(f"--resume: no interrupted run at {folder}")
    loaded = load_checkpoint(folder, device)
    stage = loaded.manifest.get("stage")
    if stage in ("sft", "rl") and stage != wanted:  # another command's run: its settings would all differ
        raise ValueError(f"--resume: {folder} holds the state of a vstar {stage} run, not of a vstar {wanted} run: "
                         f"resume it with vstar {stage} --resume, or give vstar {wanted} another --out")  # fmt: skip
    require_same_data(folder, loaded.manifest, data)
    carry_external_ids(loaded.policy, data)
    trainer_state = loaded.trainer_state()
    if trainer_state is None:
        raise ValueError(f"--resume: {folder} holds no trainer state ({TRAINER_STATE} is missing)")
    changed = differences({k: trainer_state.get(k) for k in identity}, identity)
    if changed:
        raise ValueError(f"--resume: {folder} was written with {differs} ({'; '.join(changed)}){RESTART}")
    return loaded, trainer_state


def carry_external_ids(policy: Policy, data: RecDataset) -> None:
    """Give ``policy`` (loaded to train on ``data``, its catalog's SIDs checked equal) ``data``'s external ids, so
    the checkpoints the run writes name items as the data does now: a checkpoint written before the folder had its
    item_map.json gains them, one of an older map is brought up to date. Data without a map keeps the checkpoint's
    own (they name the same items). They are no part of the run's identity: they change no score."""
    wanted = data.catalog.external_ids
    if wanted is not None and wanted != policy.catalog.external_ids:
        policy.catalog = policy.catalog.with_external_ids(wanted)


def require_same_data(folder: Path, manifest: dict[str, Any], data: RecDataset) -> None:
    """A ``ValueError`` when the run at ``folder`` (its ``manifest``) trained on other data than ``data``."""
    if not data.trained(manifest.get("data")):
        trained_on, given = (manifest.get("data") or {}).get("fingerprint"), data.fingerprint()
        raise ValueError(
            f"--resume: {folder} was trained on other data (fingerprint {trained_on}) than --data {data.name} ({given})"
        )


def differences(stored: Any, given: Any, name: str = "") -> list[str]:
    """What differs between stored settings and the given ones, each as ``name (stored there, given now)``;
    dicts (configurations) key by key, named ``config.lr``. Tuples and lists are alike: a manifest is JSON."""
    if isinstance(stored, dict) and isinstance(given, dict):
        keys = sorted(stored.keys() | given.keys())
        return [d for k in keys for d in differences(stored.get(k), given.get(k), f"{name}.{k}" if name else k)]
    if plain(stored) == plain(given):
        return []
    return [f"{name} ({plain(stored)!r} there, {plain(given)!r} now)"]


def plain(value: Any) -> Any:
    """``value`` with tuples as lists, as it reads back from JSON."""
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


PROBE_ROWS = 4  # rows a refit's validation decodes to see that its model still scores SIDs


def scores_a_sid(policy: Policy, rows: Sequence[Sample]) -> bool:
    """Whether greedy constrained decoding of ``rows`` ranks any SID (a diverged model scores none as finite)."""
    return any(rank_samples(policy, rows, beam_decoder(1), progress=False))


def selection_score(
    policy: Policy, select_rows: Sequence[Sample], train_rows: Sequence[Sample], beams: int
) -> tuple[float, float]:
    """(HR@10, NDCG@10) by beam search on the selection rows; sharded and row-weighted over the ranks.
    ``NonFinite`` when no row's list reaches 10 SIDs: the model scored the rest nan or -inf."""
    m = sharded_metrics(policy, select_rows, train_rows, beam_decoder(beams), ("HR@10", "NDCG@10"))
    hr, ndcg = m["HR@10"], m["NDCG@10"]
    if hr is None or ndcg is None:
        raise NonFinite(f"the model scored fewer than 10 SIDs as finite for each of {len(select_rows)} selection rows")
    return hr, ndcg


@dataclass
class Checkpointer:
    """Validations of one run: the best model to ``out``, the latest state to ``resume_folder(out)``."""

    policy: Policy
    out: Path
    manifest: dict[str, Any]
    select_rows: Sequence[Sample]
    train_rows: Sequence[Sample]
    eval_beams: int

    def validate(
        self,
        state: TrainState,
        trainer_state: Callable[[], dict[str, Any]],
        extras: dict[str, dict[str, torch.Tensor]] | None = None,
        selectable: bool = True,
        averaged: Callable[[], AbstractContextManager[Any]] = nullcontext,
    ) -> None:
        """Score the selection rows and keep the best model (when ``selectable``) and the latest state. Inside
        ``averaged()`` the policy holds the weights to score and keep (an EMA); the resume state keeps the
        training weights."""
        resume_dir = resume_folder(self.out)
        if not self.select_rows:  # nothing held out (a refit): the latest selectable model is the one to keep
            probe = self.train_rows[:PROBE_ROWS]
            with averaged():
                if not scores_a_sid(self.policy, probe):
                    raise NonFinite(f"the model scored no SID as finite for {len(probe)} training rows")
            state.history.append({"step": state.step, "epoch": state.epoch})
            if is_main():
                if selectable:  # not RL's init at step 0: an earlier run's result stays until the first RL model
                    with averaged():
                        self._save_best(state, extras)
                save_checkpoint(resume_dir, self.policy, self.manifest, extras, trainer_state=trainer_state())
            barrier()
            return
        with averaged():
            score = selection_score(self.policy, self.select_rows, self.train_rows, self.eval_beams)
            state.history.append({"step": state.step, "epoch": state.epoch, "HR@10": score[0], "NDCG@10": score[1]})
            log.info("step %d: selection HR@10 %.4f NDCG@10 %.4f", state.step, *score)
            if selectable and score > state.best:
                state.best = score
                if is_main():
                    self._save_best(state, extras)
        if is_main():
            save_checkpoint(resume_dir, self.policy, self.manifest, extras, trainer_state=trainer_state())
        barrier()

    def _save_best(self, state: TrainState, extras: dict[str, dict[str, torch.Tensor]] | None) -> None:
        save_checkpoint(self.out, self.policy, self.manifest | {"selection": state.history[-1]}, extras)
