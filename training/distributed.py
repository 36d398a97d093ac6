"""Data-parallel training under ``torchrun`` / ``accelerate launch``: the few collectives SFT and RL need.

A run is distributed when a launcher set ``WORLD_SIZE`` (``torchrun``,
``accelerate launch`` and ``torch.distributed.run`` all set ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK``). Without it, every helper here is the identity or a
constant and no collective runs, so a plain ``vstar sft`` / ``vstar rl`` is
byte-for-byte what it was before this module existed.

Design decisions:

* Backend: NCCL on CUDA (rank r drives ``cuda:LOCAL_RANK``), gloo on CPU.
* ``--batch-size`` is the *global* batch: every rank walks the same seeded list
  of batches and takes a contiguous slice of each one (sizes differ by at most
  one row), so a run's data, step count and schedule do not depend on the world
  size, and ``--resume`` may even change it. A global batch smaller than the
  world size is a ``ValueError``; the last, short batch of an epoch can still
  leave a rank without a row: that rank runs the batch's first row with weight 0
  so that DDP's gradient all-reduce still has every rank.
* Loss scaling: each rank's loss is a mean over its own rows (tokens); it is
  multiplied by ``world * local_count / global_count`` so that DDP's average of
  the rank gradients equals the gradient of the global batch's mean exactly.
* Only rank 0 writes checkpoints, logs, step files and shows a progress bar;
  ``barrier`` after each write keeps the ranks together.
* Validation is sharded: each rank decodes a contiguous slice of the selection
  rows and the row-weighted means are combined with ``all_gather_object`` and
  summed in rank order in Python, so every rank gets the same float and the
  best-model and stop decisions never diverge.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")
TIMEOUT = timedelta(minutes=30)  # rank 0 writing a large checkpoint must not trip the others' barrier


def launched() -> bool:
    """True when a distributed launcher started this process (``WORLD_SIZE`` is set)."""
    return "WORLD_SIZE" in os.environ


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes files and logs."""
    return rank() == 0


def init_distributed(device: str) -> str:
    """Join the process group the launcher describes; returns this rank's torch device."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kind = torch.device(device).type
    if kind == "cuda":
        if device != "cuda":
            raise ValueError(f"under torchrun pass --device cuda (rank r uses cuda:LOCAL_RANK), not {device!r}")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        backend = "nccl"
    elif kind == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"distributed training runs on cuda (nccl) or cpu (gloo), not {device!r}")
    dist.init_process_group(backend, timeout=TIMEOUT)
    if not is_main():
        logging.getLogger().setLevel(logging.WARNING)
    return device


@contextmanager
def distributed_session(device: str) -> Iterator[str]:
    """Process group for the body when launched distributed (yields this rank's device); a no-op otherwise."""
    if not launched():
        yield device
        return
    device = init_distributed(device)
    yield device
    # Not on an exception: the group stays until this process exits. Destroyed at once, it would fail the
    # other ranks' pending collectives, and a rank that failed alone would be stopped with them (the launcher
    # stops every rank when one exits) before it reported why (``vstar.fail`` waits first on ranks other than 0).
    dist.destroy_process_group()


def require_global_batch(batch_size: int) -> None:
    """``--batch-size`` is the global batch: it must give every rank at least one row."""
    if batch_size < world_size():
        raise ValueError(
            f"--batch-size {batch_size} is the global batch and must be >= the world size {world_size()} "
            "(each rank takes a slice of every batch)"
        )


@dataclass(frozen=True)
class Shard:
    rows: list[int]  # this rank's slice of the global batch (never empty)
    counted: bool  # False: the slice was empty and ``rows`` is a stand-in with weight 0
    batch: list[int]  # the whole global batch: ``rows`` is ``batch[start : start + len(rows)]``
    start: int  # where ``rows`` begins in ``batch``, so that per-row draws over the batch match one process's


def shard(batch: Sequence[int]) -> Shard:
    """This rank's contiguous slice of one global batch (the whole batch when not distributed)."""
    lo, hi = slice_bounds(len(batch))
    if lo == hi:
        return Shard([batch[0]], False, list(batch), 0)
    return Shard(list(batch[lo:hi]), True, list(batch), lo)


def slice_bounds(n: int) -> tuple[int, int]:
    """[lo, hi) of this rank's part of n items; parts differ in size by at most one."""
    r, w = rank(), world_size()
    return r * n // w, (r + 1) * n // w


def shard_rows(rows: Sequence[T]) -> Sequence[T]:
    """This rank's contiguous slice of ``rows`` (may be empty); all of them when not distributed."""
    lo, hi = slice_bounds(len(rows))
    return rows[lo:hi]


def wrap_ddp(module: nn.Module) -> nn.Module:
    """``module`` behind DistributedDataParallel when distributed (gradients all-reduced), else itself.

    Train through the returned module; decode and save through ``module``: they share the parameters.
    """
    if not dist.is_initialized():
        return module
    device = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over the ranks, in float64 (exact for counts, the same on every rank)."""
    if not dist.is_initialized():
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)  # (len(values),)
    dist.all_reduce(total)
    return total.tolist()


def global_mean(value: float, count: float) -> float:
    """The mean over the whole batch of a rank's mean ``value`` over its ``count`` elements (0 for a stand-in
    shard), e.g. the step's loss for the curves; ``value`` itself when not distributed."""
    if not dist.is_initialized():
        return value
    weighted, total = sum_over_ranks([value * count, count])
    return weighted / total if total > 0 else float("nan")


def loss_scales(local_counts: Sequence[float]) -> list[float]:
    """Per-term loss factors ``world * local / global`` that turn rank means into the global-batch mean.

    ``local_counts`` are the elements each mean divides by on this rank (0 for a stand-in shard); a
    term with no elements anywhere gets 0. Not distributed: all 1.0 and no collective.
    """
    if not dist.is_initialized():
        return [1.0] * len(local_counts)
    totals = sum_over_ranks(local_counts)
    return [world_size() * c / t if t > 0 else 0.0 for c, t in zip(local_counts, totals, strict=True)]


def weighted_mean(
    metrics: Mapping[str, float], weight: float, maxed: Sequence[str] = (), summed: Sequence[str] = ()
) -> dict[str, float]:
    """Metrics averaged over the ranks with ``weight`` (e.g. rows) per rank; ``maxed`` keys take the maximum,
    ``summed`` keys (counts over the rank's part of the batch) the sum over the ranks with a weight above 0
    (a stand-in shard counts nothing).

    Not distributed: ``metrics`` unchanged.
    """
    if not dist.is_initialized():
        return dict(metrics)
    keys = sorted(metrics)
    gathered: list[tuple[float, dict[str, float]] | None] = [None] * world_size()
    dist.all_gather_object(gathered, (float(weight), {k: float(metrics[k]) for k in keys}))
    parts = [p for p in gathered if p is not None]
    total = sum(w for w, _ in parts)
    out = {}
    for k in keys:
        if k in maxed:
            out[k] = max(m[k] for _, m in parts)
        elif k in summed:
            out[k] = sum(m[k] for w, m in parts if w > 0)
        else:
            out[k] = sum(w * m[k] for w, m in parts) / total if total > 0 else float("nan")
    return out


def barrier() -> None:
    """Wait for every rank (no-op when not distributed); used after rank 0's checkpoint writes."""
    if dist.is_initialized():
        dist.barrier()


def fork_rng(seed: int, step: int) -> None:
    """Give each rank its own torch RNG stream (dropout masks) from (seed, rank, step); no-op when not distributed.

    Called before every step, so a ``--resume`` with the same world size draws what the uninterrupted run
    drew, without storing every rank's RNG state.
    """
    if dist.is_initialized():
        torch.manual_seed(int(np.random.SeedSequence([seed, rank(), step]).generate_state(1)[0]))
