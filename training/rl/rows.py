"""Which rows an RL run's counts, fusion and warnings rest on: the fusion weight its result is served at, the
rows the transition counts are fit on, the rows its SFT init trained on, and ``vstar fuse`` for an RL checkpoint.

``training.rl.run`` drives these around training; ``vstar fuse`` calls ``fuse_rl_checkpoint`` on a finished run;
``vstar diagnose`` rebuilds a run's fused rollouts from its checkpoint with ``rollout_fusion``.
Why RL fuses at its init's weight, and with which counts, is in ``training.rl.run``'s module docstring.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.transition import ShallowFusion, TransitionCounts
from training.data.dataset import HoldoutRule, RecDataset, Sample, split_for_training
from training.evaluation.fusion import FUSION_BEAMS, FUSION_WEIGHTS, fusable_checkpoint, fuse_trained, require_held_out
from training.rl.config import RLConfig

log = logging.getLogger(__name__)


def reference_fusion(init: str | Path) -> dict[str, Any]:
    """The ``--init`` checkpoint's fusion choice (manifest ``fusion``), empty when it has none."""
    manifest = json.loads((Path(init) / "manifest.json").read_text())
    fusion = manifest.get("fusion") or {}
    return fusion if fusion.get("chosen_by") != "nothing held out" else {}


def result_fusion_weight(init: str | Path, config: RLConfig) -> float | None:
    """``--fusion-weight``, else the ``--init`` checkpoint's chosen weight; None when neither has one."""
    if config.fusion_weight is not None:
        return config.fusion_weight
    start_fusion = reference_fusion(init)
    return float(start_fusion["weight"]) if "weight" in start_fusion else None


def fused_rollouts(data: RecDataset, init: str | Path, config: RLConfig, train_rows: list[Sample]) -> ShallowFusion:
    """The fusion of ``--fused-rollouts``: counts of the rows the result is counted on (``counted_rows``, the
    training rows among them, each row's own transition left out when it decodes) at the result's weight."""
    weight = result_fusion_weight(init, config)
    if not weight:
        if config.fusion_weight is not None:
            source = f"--fusion-weight is {config.fusion_weight:g}"
        elif weight is None:
            source = f"the --init checkpoint {init} has no chosen fusion weight"
        else:
            source = f"the --init checkpoint {init} has fusion weight {weight:g}"
        raise ValueError(f"--fused-rollouts needs a fusion weight above 0: {source}; pass --fusion-weight W above 0")
    rows = counted_rows(data, config, train_rows)
    return ShallowFusion(TransitionCounts.fit((s.history, s.target) for s in rows), weight)


@dataclass(frozen=True)
class RolloutFusion:
    """The fusion an RL checkpoint's run decoded its rollouts with (``--fused-rollouts``), rebuilt from its
    manifest for ``vstar diagnose``: the run's weight, and counts of the rows it counted (``counted_rows``)."""

    fusion: ShallowFusion | None  # None: rollouts of the policy alone, or not rebuilt (``note`` says why)
    counted: frozenset[Sample] = frozenset()  # the rows the counts hold: each one's own transition left out
    count_rows: int = 0
    note: str | None = None  # why a run's fused rollouts are not reproduced

    def record(self, rows: Sequence[Sample]) -> dict[str, Any] | None:
        """What decoded ``rows``, for a JSON report; None unfused."""
        if self.fusion is None:
            return None
        return {
            "weight": self.fusion.weight,
            "count_rows": self.count_rows,
            "transition_pairs": self.fusion.counts.num_pairs,
            "own_transitions_left_out": sum(r in self.counted for r in rows),  # rows the counts hold
        }


def rollout_fusion(manifest: dict[str, Any], data: RecDataset) -> RolloutFusion:
    """The fusion of the run whose checkpoint has ``manifest``, if it fused its rollouts, rebuilt on ``data``.

    The weight is the manifest's ``rollout_fusion_weight``, which the run records from its start; in a
    checkpoint written before that key, the run's ``--fusion-weight``, else its ``--init``'s as the run
    recorded it when it ended (manifest ``fusion`` chosen by "init"). The counts are those of
    ``fused_rollouts``: the run's ``counted_rows``, never its held-out rows. When an older checkpoint no longer
    tells the weight (``vstar fuse`` chose another, or the run had not ended) or ``data`` is not what the run
    trained on, the fusion is not rebuilt: ``note``.
    """
    stored = manifest.get("rl_config") or {}
    if not stored.get("fused_rollouts"):
        return RolloutFusion(None)
    run = "its RL run decoded its rollouts fused with transition counts (--fused-rollouts)"
    unfused = "so the candidate sets measured here, the policy's alone, are not the ones it trained on"
    chosen = manifest.get("fusion") or {}
    weight = manifest.get("rollout_fusion_weight")  # recorded since it was kept apart from ``fusion``
    if weight is None:
        weight = stored.get("fusion_weight")
    if weight is None and chosen.get("chosen_by") == "init":
        weight = chosen["weight"]
    if weight is None:
        how = f"its fusion is chosen_by {chosen.get('chosen_by')!r}" if chosen else "it records no fusion"
        why = f"at its --init's weight, which the checkpoint no longer records ({how})"
        return RolloutFusion(None, note=f"{run} {why}, {unfused}")
    if not data.trained(manifest.get("data")):
        why = f"with counts of rows of other data than {data.name!r} (fingerprints differ)"
        return RolloutFusion(None, note=f"{run} {why}, {unfused}")
    rule = StoredRows.of(stored)
    train_rows, _ = split_for_training(data, rule)
    rows = counted_rows(data, rule, train_rows)
    counts = TransitionCounts.fit((s.history, s.target) for s in rows)
    return RolloutFusion(ShallowFusion(counts, float(weight)), frozenset(rows), len(rows))


def counted_rows(data: RecDataset, rule: HoldoutRule, train_rows: list[Sample]) -> list[Sample]:
    """The rows the fused counts are fit on besides the held-out ones: the run's training rows and, when it
    trains on valid alone (SFT on train, RL on the rows SFT never saw), train too: every row before test."""
    return train_rows if "train" in rule.train_splits else data.samples(["train"]) + train_rows


@dataclass(frozen=True)
class StoredRows:
    """The ``HoldoutRule`` of a stored ``rl_config``."""

    train_splits: tuple[str, ...]
    holdout: int

    @classmethod
    def of(cls, stored: dict[str, Any]) -> StoredRows:
        """The rule of a manifest's ``rl_config`` or ``sft_config``."""
        return cls(tuple(stored["train_splits"]), int(stored["holdout"]))


def fuse_rl_checkpoint(
    path: str | Path,
    data: RecDataset,
    weights: Sequence[float] = FUSION_WEIGHTS,
    beams: int = FUSION_BEAMS,
    device: str = "cpu",
) -> dict[str, Any]:
    """``vstar fuse`` on an RL checkpoint: choose its fusion weight on the rows its run held out (the first
    ``eval_limit``, the rows it validated on), with counts of every row before them, as SFT chooses its own.

    A run that held nothing out (``--holdout 0`` with valid trained on) has no rows to choose on: that is an
    error, and the weight it was fused at stays. When the ``--init`` checkpoint is still there and it, or one it
    descends from, trained on some of those rows (an SFT refit, an RL init that trained on them: ``lineage``),
    the choice is made but flagged: such rows flatter the policy and choose too small a weight.
    """
    path = Path(path)
    checkpoint = fusable_checkpoint(path, data, "rl", device)
    manifest = checkpoint.manifest
    stored = manifest["rl_config"]
    rule = StoredRows.of(stored)
    train_rows, held_out = split_for_training(data, rule)
    require_held_out(
        path, manifest, held_out, rule.holdout, f"--train-splits {','.join(rule.train_splits)} --holdout 0"
    )
    select_rows = held_out[: stored["eval_limit"]]
    seen = init_trained_on(manifest.get("init"), data, select_rows)
    if seen:
        log.warning(
            "the --init checkpoint %s trained on %d of the %d selection rows: they flatter the policy, so the "
            "weight chosen on them is likely too small",
            manifest["init"],
            seen,
            len(select_rows),
        )
    counted = counted_rows(data, rule, train_rows)
    fusion = fuse_trained(
        path, None, counted, held_out, stored["eval_limit"], device, weights, beams, checkpoint, progress=True
    )
    return {"checkpoint": str(path), "init_trained_on_selection_rows": seen} | fusion


MAX_INIT_HOPS = 16  # RL from RL from ... SFT: links followed back to the SFT model (a loop stops there too)


def lineage(manifest: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The row rules of a checkpoint of ``manifest`` and of every checkpoint it descends from: an RL checkpoint's
    ``rl_config``, then its ``--init``'s, followed back through RL inits to the SFT model's ``sft_config``, which
    comes last; None where a link is gone or names no SFT model."""
    configs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _ in range(MAX_INIT_HOPS):
        if manifest.get("sft_config"):
            return [*configs, dict(manifest["sft_config"])]
        init = manifest.get("init")
        if manifest.get("stage") != "rl" or not init or init in seen:
            return None
        if manifest.get("rl_config"):
            configs.append(dict(manifest["rl_config"]))
        seen.add(init)
        try:
            manifest = json.loads((Path(init) / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(manifest, dict):
            return None
    return None


def root_sft_config(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The ``sft_config`` of the SFT model a checkpoint of ``manifest`` descends from: its own (an SFT
    checkpoint), else, for an RL one, its ``--init``'s, followed back through RL inits (``lineage``); None where
    a link is gone or names no SFT model."""
    configs = lineage(manifest)
    return configs[-1] if configs else None


def init_trained_on(init: str | None, data: RecDataset, rows: Sequence[Sample]) -> int | None:
    """How many of ``rows`` the checkpoint at ``init`` or any it descends from trained on: an RL init's own rows,
    its RL inits' and those of the SFT model the chain starts from (``lineage``); None when a link (or the SFT
    config) is gone."""
    try:
        manifest = json.loads((Path(init) / "manifest.json").read_text()) if init else None
    except (OSError, ValueError):
        return None
    configs = lineage(manifest) if isinstance(manifest, dict) else None
    if configs is None:
        return None
    trained = {row for stored in configs for row in split_for_training(data, StoredRows.of(stored))[0]}
    return sum(r in trained for r in rows)


def sft_trained_on(stored: dict[str, Any] | None, data: RecDataset, rows: Sequence[Sample]) -> int | None:
    """How many of ``rows`` an SFT run of the manifest's ``sft_config`` ``stored`` trained on; None without one."""
    if not stored:
        return None
    trained, _ = split_for_training(data, StoredRows.of(stored))
    seen = set(trained)
    return sum(r in seen for r in rows)
