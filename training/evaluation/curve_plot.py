"""``vstar plot``: the TensorBoard curves of SFT and RL runs as one PNG (matplotlib), for a README or a report.

* The event files are read with TensorBoard's own reader (``EventAccumulator``),
  so the curves are the ones TensorBoard shows, a resumed run's purged stretch
  included.
* One row per run, one panel per curve the run has, in a fixed order: loss,
  learning rate, held-out HR@10 and NDCG@10 (one panel), then RL's within-group
  reward std, reachability and value loss.
* The PNG replaces an earlier one in one step (``replacing_file``): a write cut
  short (Ctrl-C, a full disk) leaves the earlier figure whole.
* Per-step measurements are drawn raw (faint) and smoothed with TensorBoard's
  debiased exponential moving average; the learning rate as it is; held-out
  scores, a few points, as markers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from models.atomic_folder import replacing_file  # noqa: E402
from training.run_files import default_curves  # noqa: E402

log = logging.getLogger(__name__)

PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("train/loss",)),
    ("learning rate", ("train/lr",)),
    ("held-out HR@10, NDCG@10", ("heldout/HR@10", "heldout/NDCG@10")),
    ("reward std within groups", ("rl/reward_std",)),
    ("reachability", ("rl/reachability",)),
    ("value loss", ("rl/value_loss",)),
)
Curves = dict[str, tuple[list[int], list[float]]]


def event_folder(run: Path) -> Path:
    """``run`` itself when it holds event files, else the ``<run>.tb`` that SFT and RL write beside a checkpoint."""
    for folder in (run, default_curves(run)):
        if folder.is_dir() and any(folder.glob("events.out.tfevents.*")):
            return folder
    raise ValueError(f"no TensorBoard event files in {run} or {default_curves(run)}")


class _ReaderLog(logging.Handler):
    """What TensorBoard's reader logs while it reads: it says at DEBUG alone that a record failed its checksum,
    and stops reading the file there, so a damaged file would plot as a run cut short without a word."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def read_curves(folder: Path) -> Curves:
    """Every scalar of the event files in ``folder``; a record that fails its checksum is warned about (the
    curves stop at the step before it), a file that ends in a cut record (a run stopped mid-write) is not."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
    reader = logging.getLogger("tensorboard")  # it logs "No path found after <file>" at INFO per run: kept here
    level, propagate, heard = reader.level, reader.propagate, _ReaderLog()
    reader.setLevel(logging.DEBUG)
    reader.propagate = False
    reader.addHandler(heard)
    try:
        events.Reload()
    finally:
        reader.removeHandler(heard)
        reader.setLevel(level)
        reader.propagate = propagate
    for record in heard.records:
        message = record.getMessage()
        if "crc32 check" in message:
            log.warning("%s: a damaged record, which the curves stop before (%s)", folder, message)
        elif record.levelno >= logging.WARNING:
            log.warning("%s: %s", folder, message)
    curves: Curves = {}
    for tag in events.Tags()["scalars"]:
        points = events.Scalars(tag)
        curves[tag] = ([p.step for p in points], [p.value for p in points])
    return curves


def run_labels(runs: Sequence[Path]) -> list[str]:
    """Each run's name in the figure: its folder's name (``.`` named by where it is), with as many folders above
    it as tell apart runs of the same name (``s0/vstar``, ``s1/vstar``)."""
    parts = [Path(run).resolve().parts for run in runs]
    depths = [1] * len(parts)
    while True:
        labels = ["/".join(p[-d:]).lstrip("/") or "/" for p, d in zip(parts, depths, strict=True)]
        shared = [i for i, label in enumerate(labels) if labels.count(label) > 1 and depths[i] < len(parts[i])]
        if not shared:  # every name its own, or a run given twice: the same name
            return labels
        for i in shared:
            depths[i] += 1


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased for its zero start. A non-finite value
    (a nan or inf loss) is drawn as it is and left out of the average, as TensorBoard does, so that it does not
    turn every later point of the curve into nan."""
    out, last, counted = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        counted += 1
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight**counted) if weight > 0 else v)
    return out


def plot_runs(runs: Sequence[Path], out: Path, smoothing: float = 0.6) -> Path:
    """Draw ``runs`` (checkpoint or event folders) to the PNG ``out``; returns ``out``."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    rows = []
    for run, name in zip(runs, run_labels(runs), strict=True):
        curves = read_curves(event_folder(run))
        panels = [(title, [t for t in tags if t in curves]) for title, tags in PANELS]
        rows.append((name, curves, [(title, tags) for title, tags in panels if tags]))
    empty = [str(run) for run, (_, _, panels) in zip(runs, rows, strict=True) if not panels]
    if empty:  # a run without any of them would be a blank row among the others
        raise ValueError(f"none of {', '.join(t for _, tags in PANELS for t in tags)} in {', '.join(empty)}")
    cols = max(len(panels) for _, _, panels in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.4 * cols, 2.6 * len(rows)), squeeze=False)
    for r, (name, curves, panels) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            if c >= len(panels):
                ax.axis("off")
                continue
            title, tags = panels[c]
            for tag in tags:
                steps, values = curves[tag]
                label = tag.split("/", 1)[1]
                if tag.startswith("heldout/"):
                    ax.plot(steps, values, "o-", markersize=3, label=label)
                elif tag == "train/lr":  # a schedule, not a noisy measurement
                    ax.plot(steps, values, linewidth=1.4)
                else:
                    (raw,) = ax.plot(steps, values, alpha=0.25, linewidth=0.8)
                    ax.plot(steps, smooth(values, smoothing), color=raw.get_color(), linewidth=1.4)
            if len(tags) > 1:
                ax.legend(fontsize=7)
            ax.set_title(f"{name}: {title}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with replacing_file(out) as f:  # an earlier figure stays whole if this write is cut short
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return out
