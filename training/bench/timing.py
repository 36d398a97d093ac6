"""The benchmarks' clock: the best of interleaved repeats.

Every ``vstar bench`` that compares implementations runs one call of each per
repeat, so that load from other processes hits them alike, and reports each
one's best time (timeit's convention: the minimum is the run least disturbed
by other load; on a shared machine the median mostly measures the neighbours).
``vstar bench train`` interleaves its two trainers' steps alike but reports
their mean: each RL step changes the policy, so no two steps are the same work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from models.device import synchronize


def timed_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """One call's wall time in ms, the device's queued work waited for on both sides."""
    synchronize(device)  # the model's device: cuda:1's work is not waited for on cuda:0
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - t0) * 1000


def interleaved_ms(runs: Mapping[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Each run's times in ms over ``repeats`` rounds of one call of each, in order (warm them up first)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(timed_ms(fn, device))
    return times


def best_of_interleaved(runs: Mapping[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, float]:
    """Each run's best time in ms over ``repeats`` rounds of one call of each, in order (warm them up first)."""
    return {name: min(v) for name, v in interleaved_ms(runs, repeats, device).items()}
