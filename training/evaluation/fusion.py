"""Shallow fusion with the transition counts: choose its weight on held-out rows, store it in the checkpoint.

``models.transition`` has the counts and the fused beam search; this module
is the selection step that SFT runs when it ends and that ``vstar fuse`` runs
on an existing checkpoint, SFT (``training.sft.trainer``) or RL
(``training.rl.run``, which fuses at its init's weight unless asked):

* the counts are fit on the checkpoint's own training rows (re-derived from its
  stored SFT or RL config and checked against its data fingerprint), so the held-out
  rows are outside both the model's and the counts' training data;
* each weight of ``FUSION_WEIGHTS`` is scored by beam search with
  ``FUSION_BEAMS`` beams (``vstar eval``'s default) on the held-out selection
  rows; the best mean of the seven reported metrics (HR@1/3/5/10,
  NDCG@3/5/10) wins, ties to the smaller weight; means are compared as the
  manifest stores them, to 4 decimals, so weights whose means round alike
  tie. The mean rather than SFT's
  HR@10 because what fusion changes is the order at the top, and a model is
  judged at every cut-off. The grid reaches weights large enough that the
  counts decide the order among observed transitions (at ``w = 8`` one more
  count is worth several nats of policy log-prob) so the choice is not stuck
  at the grid's edge; where the largest weight still wins alone (a catalog
  whose next items follow the last ones closely), a warning says so and gives
  the ``vstar fuse --weights`` that tries larger ones;
* once the weight is chosen, the counts are fit again on the training rows
  *and* the held-out rows, and those are the counts stored: the held-out rows
  are the most recent ones, the transitions closest to what is recommended
  next, and a count table needs no epoch or weight chosen on them (the policy
  is not refit; its selection stands). The count baseline is fit on the same
  rows, so the two compare like with like;
* the counts (extra ``transitions``) and the choice (manifest ``fusion``: the
  weight, every weight's score, the rows counted and their transition pairs)
  are written into the checkpoint, which ``vstar eval`` then decodes with (on
  valid rows, which those counts hold, with counts of the rows before the
  scored ones: ``refit_before``). A
  refit has no held-out rows: it takes the weight chosen by its held-out run
  (``--fusion-weight``). SFT writes its run's figures (manifest ``run``) in the
  same write, so that a resumed refit reports its finished held-out run as the
  run itself did (``training.sft.trainer``).
* under torchrun every rank scores its slice of the held-out rows for each
  weight and the scores are row-weighted over the ranks (as a validation is),
  so the choice costs 1/N of one process's time and no rank waits on another
  for the whole of it; rank 0 alone writes the checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from models.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
from models.transition import STATE_NAME, ShallowFusion, TransitionCounts
from training.data.dataset import RecDataset, Sample
from training.distributed import barrier, is_main
from training.evaluation.decoders import beam_decoder
from training.evaluation.evaluate import sharded_metrics

log = logging.getLogger(__name__)

FUSION_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
FUSION_BEAMS = 50
REPORTED = ("HR@1", "HR@3", "HR@5", "HR@10", "NDCG@3", "NDCG@5", "NDCG@10")


def refit_before(fusion: ShallowFusion, rows: Sequence[Sample]) -> ShallowFusion:
    """``fusion``'s weight on counts fit on ``rows`` alone (the rows before the ones scored): a checkpoint's
    stored counts hold every row before test, so on valid rows they would hold each scored row's own answer.
    The refit keeps the stored counts' window."""
    counts = TransitionCounts.fit(((s.history, s.target) for s in rows), fusion.counts.window)
    return ShallowFusion(counts, fusion.weight)


def choose_weight(
    checkpoint: LoadedCheckpoint,
    counts: TransitionCounts,
    select_rows: Sequence[Sample],
    train_rows: Sequence[Sample],
    weights: Sequence[float] = FUSION_WEIGHTS,
    beams: int = FUSION_BEAMS,
    progress: bool = False,
) -> dict[str, Any]:
    """Score every weight on ``select_rows``; returns the manifest's ``fusion`` entry. ``progress``: a bar over
    the weights (each is a decode of every row: the small recipe's end is 9 x 2,000 rows x 50 beams)."""
    if not select_rows:
        raise ValueError("choosing the fusion weight needs held-out rows; a refit takes --fusion-weight")
    if not weights or any(w < 0 for w in weights):
        raise ValueError(f"fusion weights must be a non-empty list of numbers >= 0, got {list(weights)}")
    grid = []
    bar = tqdm(weights, desc="fusion weights", unit="weight", disable=not progress or not is_main(), leave=False)
    for w in bar:
        decode = beam_decoder(beams, ShallowFusion(counts, w) if w > 0 else None)
        measured = sharded_metrics(checkpoint.policy, select_rows, train_rows, decode, REPORTED)  # each rank its slice
        m = {k: v for k, v in measured.items() if v is not None}
        if len(m) < len(REPORTED):  # None: no row's list reaches the cut-off (a model that scores nan or -inf)
            raise ValueError(
                f"fusion weight {w:g}: the model scored too few SIDs as finite to measure "
                f"{', '.join(k for k in REPORTED if k not in m)} on its {len(select_rows)} held-out rows"
            )
        row = {"weight": w} | {k: round(m[k], 4) for k in REPORTED}
        grid.append(row | {"mean": round(sum(m[k] for k in REPORTED) / len(REPORTED), 4)})
        bar.set_postfix(weight=w, mean=grid[-1]["mean"])
        log.info(  # every rank logs it; the CLI quiets ranks other than 0
            "fusion weight %g: held-out mean %.4f (HR@1 %.4f, NDCG@10 %.4f)",
            w,
            grid[-1]["mean"],
            m["HR@1"],
            m["NDCG@10"],
        )
    best = max(grid, key=lambda r: (r["mean"], -r["weight"]))
    if len(grid) > 1 and len({r["mean"] for r in grid}) == 1 and is_main():  # ties go to the smallest weight
        log.warning(
            "every fusion weight scored the same (held-out mean %.4f) on the %d selection rows, too few to choose "
            "on: the smallest, %g, is kept%s; give the weight yourself (vstar sft / vstar rl --fusion-weight) or "
            "choose on more held-out rows",
            best["mean"], len(select_rows), best["weight"], " (fusion off)" if best["weight"] == 0 else "",
        )  # fmt: skip
    if (edge := grid_edge_warning(grid)) is not None and is_main():
        log.warning(edge)
    return {"weight": best["weight"], "selection_rows": len(select_rows), "beams": beams, "grid": grid}


def grid_edge_warning(grid: Sequence[dict[str, Any]]) -> str | None:
    """What to say when the grid's largest weight scored best, alone: the counts may be worth more than the grid
    lets them weigh (a catalog whose next items follow the last ones closely), so a larger weight may score
    better still. None otherwise (a tie with a smaller weight keeps the smaller one: no edge)."""
    if len(grid) < 2:
        return None
    top = max(grid, key=lambda r: r["weight"])
    if any(r["mean"] >= top["mean"] for r in grid if r is not top):
        return None
    tried = ",".join(f"{r['weight']:g}" for r in sorted(grid, key=lambda r: r["weight"]))
    return (
        f"the grid's largest fusion weight, {top['weight']:g}, scored best (held-out mean {top['mean']:.4f}): a "
        f"larger one may score better still; try one with vstar fuse --weights {tried},{2 * top['weight']:g},"
        f"{4 * top['weight']:g}"
    )


def fusable_checkpoint(path: Path, data: RecDataset, stage: str, device: str = "cpu") -> LoadedCheckpoint:
    """``vstar fuse``'s checks: the checkpoint at ``path``, loaded once, a ``stage`` one trained on this data."""
    checkpoint = load_checkpoint(path, device)
    manifest = checkpoint.manifest
    if manifest.get("stage") != stage or f"{stage}_config" not in manifest:
        raise ValueError(f"checkpoint {path} is not an {stage.upper()} checkpoint (stage {manifest.get('stage')!r})")
    if not data.trained(manifest.get("data")):
        raise ValueError(f"checkpoint {path} was trained on other data than {data.name!r} (fingerprints differ)")
    return checkpoint


def require_held_out(
    path: Path, manifest: dict[str, Any], held_out: Sequence[Sample], holdout: int, refit: str
) -> None:
    """A run that held nothing out has nothing to choose on: an error, and the weight it has stays. Its cause is
    ``refit`` (the options that trained on every row) when its ``holdout`` was 0, else an empty valid split."""
    if not held_out:
        weight = (manifest.get("fusion") or {}).get("weight")
        how = refit if holdout == 0 else "valid.csv has no rows"
        raise ValueError(
            f"checkpoint {path} trained on every row before test ({how}): no held-out rows to choose its fusion "
            f"weight on; it keeps weight {weight}"
        )


def write_fusion(
    path: Path,
    checkpoint: LoadedCheckpoint,
    counts: TransitionCounts,
    fusion: dict[str, Any],
    run: dict[str, Any] | None = None,
) -> None:
    """Rewrite the checkpoint at ``path`` with the counts and the fusion choice (atomically); ``run``, the
    figures of the run that trained it, goes to manifest ``run`` in the same write (None: kept as it was)."""
    manifest = {k: v for k, v in checkpoint.manifest.items() if k not in ("model_version", "extras")}
    extras = dict(checkpoint.extras) | {STATE_NAME: counts.to_state()}
    written = {"fusion": fusion} | ({"run": run} if run is not None else {})
    save_checkpoint(path, checkpoint.policy, manifest | written, extras)


def fuse_trained(
    path: Path,
    weight: float | None,
    train_rows: Sequence[Sample],
    held_out: Sequence[Sample],
    eval_limit: int | None = None,
    device: str = "cpu",
    weights: Sequence[float] = FUSION_WEIGHTS,
    beams: int = FUSION_BEAMS,
    checkpoint: LoadedCheckpoint | None = None,
    run: dict[str, Any] | None = None,
    progress: bool = False,
    given_by: str = "given",
) -> dict[str, Any]:
    """Store transition counts and a fusion weight in the checkpoint at ``path``.

    ``weight`` None chooses it on the first ``eval_limit`` rows of ``held_out``
    with counts of ``train_rows`` (with none held out: 0, fusion off); the
    counts stored are then those of ``train_rows`` and all of ``held_out``.
    ``checkpoint``: the one at ``path`` when the caller has loaded it already;
    ``run``: the training run's figures, stored with the choice (``write_fusion``). ``chosen_by`` records
    how the weight was chosen: ``given_by`` for a given ``weight`` ("given": by ``--fusion-weight``; "held-out
    run": a refit's, chosen by its held-out run; "init": an RL run's, its ``--init``'s), else "held-out" or
    "nothing held out".
    """
    select_rows = held_out[:eval_limit]
    choosing = weight is None and bool(select_rows)
    # rank 0 reads it to rewrite it; the other ranks only to score their slices of a choice, whose collectives
    # keep rank 0 from writing until each has read it. Read with no choice to make, it could be mid-replace
    # (rank 0 writing meanwhile: missing, where the file system cannot swap folders in one step).
    if checkpoint is None and (is_main() or choosing):
        checkpoint = load_checkpoint(path, device)
    counts = TransitionCounts.fit((s.history, s.target) for s in train_rows)
    if weight is not None:
        fusion: dict[str, Any] = {"weight": weight, "chosen_by": given_by}
    elif choosing:
        assert checkpoint is not None
        chosen = choose_weight(checkpoint, counts, select_rows, train_rows, weights, beams, progress)
        fusion = chosen | {"chosen_by": "held-out"}
    else:
        if is_main():  # once, not once a rank (ranks other than 0 log warnings)
            log.warning("no held-out rows to choose the fusion weight on: fusion off (give --fusion-weight)")
        fusion = {"weight": 0.0, "chosen_by": "nothing held out"}
    counted = [*train_rows, *held_out]
    counts = TransitionCounts.fit((s.history, s.target) for s in counted)
    fusion |= {"count_rows": len(counted), "transition_pairs": counts.num_pairs}
    if is_main():
        assert checkpoint is not None
        write_fusion(path, checkpoint, counts, fusion, run)
        log.info("fusion weight %g (%s), %d transition pairs", fusion["weight"], fusion["chosen_by"], counts.num_pairs)
    barrier()  # the checkpoint holds the choice before any rank goes on
    return fusion
