"""``vstar demo``'s plan and report: the commands it runs, the summary it ends with, a request that works.

* Steps: synthetic data (kept when ``<out>/data`` already has one), SFT of the
  tiny preset on train, V-STAR RL from it on valid, test metrics of both and of
  the most-popular baseline, and the training curves as a PNG. Each step is a
  ``vstar`` command line; its JSON goes to a file under ``<out>``.
* RL trains on rows SFT never trained on, where the README's RL section finds
  that RL pays (docs/rl-experiments.md, round 3): valid less its most recent third, which chooses the
  kept model (``rl_holdout``). The default 60 steps are three passes over the
  309 rows that leaves of ``vstar synth``'s data. On its 154 held-out rows
  V-STAR moved HR@10 / NDCG@10 from 0.4545 / 0.2642 (the SFT init) to 0.4610 /
  0.2775 (the kept step, 40); the first demo, 30 steps on the train rows SFT
  had fitted, ended below SFT on valid (HR@10 0.4147 -> 0.4082).
* A second demo into the same ``--out`` trains again: SFT and RL get
  ``--force``, which replaces the earlier run's checkpoints only as the new ones
  are written (atomically) and clears its resume state, step log and curves so
  they do not mix. The demo never clears its folder itself: the data is kept,
  and a rerun that fails leaves the earlier checkpoints and reports in place.
* Report: HR@10 and NDCG@10 on the test split for pop, SFT and RL, what each
  file is, and a ``curl`` request. SFT and RL are compared twice: as models
  alone (``--fusion-weight 0``) and as ``vstar eval`` decodes them by default,
  fused with the item-transition counts both checkpoints carry (RL keeps its
  init's weight). When RL ends below SFT the report says so and
  sets the gap against one binomial standard error of HR@10 on the same rows,
  so a noisy difference reads as noise, not as a finding.
* The request is the most recent items of the first test row of the demo's own
  data: item ids the served checkpoint knows (the README shows this request).
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from models.output_path import stored_folder
from training.data.dataset import load_dataset
from training.data.dataset_writer import written_by

# (label, stem of <stem>.test.json)
MODELS = (
    ("pop", "pop"),
    ("SFT", "sft"),
    ("V-STAR", "vstar"),
    ("SFT + transitions", "sft_fused"),
    ("V-STAR + transitions", "vstar_fused"),
)
HISTORY_ITEMS = 3  # items of the example request's history
RL_HOLDOUT_SHARE = 3  # V-STAR holds out the most recent 1/3 of valid to choose its model (``rl_holdout``)


# what a demo writes into its folder: a second demo replaces them (and nothing else)
DEMO_ENTRIES = frozenset(
    {"data", "sft", "vstar", "sft.resume", "vstar.resume", "sft.tb", "vstar.tb", "sft.json", "vstar.json",
     "vstar.steps.jsonl", "curves.png", *(f"{stem}.test.json" for _, stem in MODELS)}
)  # fmt: skip


def demo_folder_problem(out: Path) -> str | None:
    """Why the demo may not write into ``out`` (a sentence), or None: a new or empty folder, or an earlier demo's
    (``vstar synth``'s data set at ``out/data`` and nothing but the demo's own files, which a second demo
    replaces: its steps overwrite with --force). Hidden entries (a killed write's staging folder) are passed
    over."""
    if not out.exists():
        return None
    if not out.is_dir():
        return f"{out} is a file, not a folder"
    held = stored_folder(out)
    if held is not None:
        return f"{out} is {held}: give a new folder"
    entries = [p.name for p in out.iterdir() if not p.name.startswith(".")]
    if not entries:
        return None
    if not written_by(out / "data", "synthetic"):
        return f"{out} holds files an earlier demo did not write (no vstar synth data set at data/): give a new folder"
    others = sorted(set(entries) - DEMO_ENTRIES)
    if others:
        return f"{out} holds files an earlier demo did not write ({', '.join(others[:5])}): give a new folder"
    return None


def synth_step(out: Path) -> list[str]:
    """The command line that writes the demo's data (``vstar synth``'s defaults)."""
    return ["synth", "--out", str(out / "data")]


def rl_holdout(data: Path) -> int:
    """Valid rows V-STAR holds out to choose its model: the most recent third (at least one), the rest it
    trains on."""
    return max(1, len(load_dataset(data).splits["valid"]) // RL_HOLDOUT_SHARE)


def demo_steps(out: Path, rl_steps: int, holdout: int) -> list[list[str]]:
    """The ``vstar`` command lines the demo runs after its data exists, in order; ``holdout``: ``rl_holdout``."""
    data, sft, rl = str(out / "data"), str(out / "sft"), str(out / "vstar")
    steps = [
        ["sft", "--data", data, "--out", sft, "--preset", "tiny", "--epochs", "8", "--lr", "5e-3", "--force",
         "--json", str(out / "sft.json")],
        ["eval", "--data", data, "--checkpoint", sft, "--split", "test", "--fusion-weight", "0",
         "--json", str(out / "sft.test.json")],
        ["eval", "--data", data, "--checkpoint", sft, "--split", "test", "--json", str(out / "sft_fused.test.json")],
        ["rl", "--data", data, "--init", sft, "--out", rl, "--algo", "vstar", "--train-splits", "valid",
         "--holdout", str(holdout), "--max-steps", str(rl_steps), "--eval-every", str(max(1, rl_steps // 3)),
         "--force", "--json", str(out / "vstar.json")],
        ["eval", "--data", data, "--checkpoint", rl, "--split", "test", "--fusion-weight", "0",
         "--json", str(out / "vstar.test.json")],
        ["eval", "--data", data, "--checkpoint", rl, "--split", "test", "--json", str(out / "vstar_fused.test.json")],
        ["baseline", "pop", "--data", data, "--split", "test", "--json", str(out / "pop.test.json")],
        ["plot", sft, rl, "--out", str(out / "curves.png")],
    ]  # fmt: skip
    return steps


def example_request(data: Path, k: int = 5) -> dict[str, Any]:
    history = load_dataset(data).splits["test"][0].history
    return {"history": list(history[-HISTORY_ITEMS:]), "k": k}


def curl_command(request: dict[str, Any], port: int) -> str:
    return f"curl -s localhost:{port}/recommend -H 'content-type: application/json' -d '{json.dumps(request)}'"


def paired_standard_error(sft: dict[str, Any], rl: dict[str, Any], metric: str) -> float:
    """The standard error of the mean per-row difference in ``metric`` between two eval results of the same
    rows (their ``target_ranks``)."""
    from training.evaluation.compare import row_metric

    ranks = [np.array([-1 if r is None else r for r in run["target_ranks"]]) for run in (sft, rl)]
    diff = row_metric(ranks[1], metric) - row_metric(ranks[0], metric)
    return float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.inf


def rl_note(
    sft: dict[str, Any], rl: dict[str, Any], rl_steps: int, names: tuple[str, str] = ("SFT", "V-STAR")
) -> str | None:
    """A plain word on RL (``names[1]``) ending below SFT (``names[0]``), each metric that fell judged by the
    standard error of its own paired per-row difference; None when none fell. ``sft``, ``rl``: eval results
    of the same rows."""
    below = [k for k in ("HR@10", "NDCG@10") if rl["metrics"][k] < sft["metrics"][k]]
    if not below:
        return None
    gaps = ", ".join(f"{k} {rl['metrics'][k] - sft['metrics'][k]:+.4f}" for k in below)
    se = {k: paired_standard_error(sft, rl, k) for k in below}
    scale = f"the standard error of the paired per-row difference on {sft['rows']} test rows: " + ", ".join(
        f"{k} {se[k]:.4f}" for k in below
    )
    beyond = [k for k in below if sft["metrics"][k] - rl["metrics"][k] > 2 * se[k]]
    if not beyond:
        return (
            f"{names[1]} ended below {names[0]} ({gaps}). That is within two standard errors ({scale}), so after "
            f"{rl_steps} RL steps of 16 prompts it is noise, not a finding; the README's RL section compares GRPO "
            "and V-STAR over longer runs and several seeds on real data."
        )
    return (
        f"{names[1]} ended below {names[0]} ({gaps}), on {' and '.join(beyond)} by more than two standard errors "
        f"({scale}): these {rl_steps} RL steps made this model worse. The demo's RL settings are the defaults, "
        "not tuned for the tiny model."
    )


def figure(value: float | None) -> str:
    """A metric in a printed table: four decimals, or "-" where the file has null (not measured)."""
    return "-" if value is None else f"{value:.4f}"


def report(out: Path, rl_steps: int) -> str:
    """The summary table, the note on RL, and what each file under ``out`` is."""
    results = {stem: json.loads((out / f"{stem}.test.json").read_text()) for _, stem in MODELS}
    rows = results["sft"]["rows"]
    weight = results["sft_fused"]["fusion_weight"]
    lines = [f"Test split of the demo's data ({rows} rows):", "", f"  {'model':<20}{'HR@10':>8}{'NDCG@10':>10}"]
    for label, stem in MODELS:
        m = results[stem]["metrics"]
        lines.append(f"  {label:<20}{figure(m['HR@10']):>8}{figure(m['NDCG@10']):>10}")
    lines += [
        "",
        *textwrap.wrap(
            f"SFT (trained on train) and V-STAR ({rl_steps} RL steps on valid, rows SFT never trained on, its most "
            "recent third held out to choose the kept model) first rank by the model alone (beam search, 50 "
            f"beams); the last two rows fuse the item-transition counts into beam search (weight {weight:g}, "
            "chosen on held-out rows after SFT and kept by RL): what `vstar eval` reports for either checkpoint "
            "by default.",
            100,
        ),
    ]
    labels = {stem: label for label, stem in MODELS}
    for sft, rl in (("sft", "vstar"), ("sft_fused", "vstar_fused")):
        note = rl_note(results[sft], results[rl], rl_steps, (labels[sft], labels[rl]))
        lines += ["", *textwrap.wrap(note, 100)] if note else []
    lines += [
        "",
        f"Files in {out}:",
        "  data/                the synthetic data set (vstar synth)",
        "  sft/, vstar/         checkpoints: SFT, then V-STAR from it (serve either with vstar serve)",
        "  *.resume/            their runs' resume states (--resume; the weights again and the optimizer's)",
        "  *.test.json          the test metrics above (pop, sft, vstar, sft_fused, vstar_fused)",
        "  sft.json, vstar.json the training summaries",
        "  vstar.steps.jsonl    V-STAR's per-step figures",
        f"  sft.tb/, vstar.tb/   TensorBoard curves (tensorboard --logdir {out})",
        "  curves.png           the same curves (vstar plot)",
    ]
    return "\n".join(lines)
