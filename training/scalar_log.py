"""Training curves as TensorBoard scalars (``torch.utils.tensorboard``), written by SFT and RL.

* Folder: ``<out>.tb`` beside the checkpoint by default (``vstar sft`` / ``vstar rl``
  ``--tensorboard DIR`` elsewhere; ``training.run_files``): the checkpoint folder
  is replaced whole at each save, so the event files cannot live inside it. ``tensorboard --logdir
  runs/`` shows every run side by side; ``vstar plot`` draws the same curves.
* Tags: ``train/loss`` and ``train/lr`` every optimizer step; ``heldout/HR@10``
  and ``heldout/NDCG@10`` at each validation (the selection rows, never test);
  RL adds ``rl/<figure>`` for each per-step figure of ``<out>.steps.jsonl``
  (reward mean and std, reachability, value loss, KL, ...). Non-finite values
  (GRPO's value loss is NaN: it has no value head) are left out.
* Only rank 0 writes (``training.distributed``). Each validation flushes, so
  the curves up to a resume point are on disk; ``--resume`` purges the events
  after that point (TensorBoard's ``purge_step``), so a curve never doubles back
  over the stretch that is trained again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from training.distributed import is_main

HELDOUT = ("HR@10", "NDCG@10")


class ScalarLog:
    """Scalars of one run; a log with no folder (or off rank 0) writes nothing."""

    def __init__(self, folder: Path | None, resumed_at: int | None = None) -> None:
        """``resumed_at``: the step a resumed run continues after; its later events are purged."""
        self.writer = None
        if folder is not None and is_main():
            self.writer = SummaryWriter(str(folder), purge_step=None if resumed_at is None else resumed_at + 1)

    def add(self, step: int, values: Mapping[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if math.isfinite(value):
                self.writer.add_scalar(tag, value, step)

    def validated(self, step: int, record: Mapping[str, float]) -> None:
        """The selection score of a validation (a refit's has none), then a flush: a validation writes
        the resume state, so the curves up to any resume point are on disk."""
        self.add(step, {f"heldout/{k}": record[k] for k in HELDOUT if k in record})
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
