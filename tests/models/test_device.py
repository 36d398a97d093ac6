"""Device helpers: what runs on a GPU host but cannot run here is pinned by recording the calls torch gets."""

from __future__ import annotations

import pytest
import torch

from models.device import synchronize
from models.policy import Policy
from training.bench import decode_bench, timing


def test_synchronize_waits_for_the_named_cuda_device_and_nothing_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.cuda.synchronize()`` without a device waits for the current device only (cuda:0 unless set): a
    model on cuda:1 would be timed by its kernel launches."""
    calls: list[object] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    synchronize(torch.device("cuda:1"))
    synchronize(torch.device("cpu"))
    assert calls == [torch.device("cuda:1")]


def test_the_decode_bench_waits_for_the_models_own_device(tiny_policy: Policy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each timed call is bracketed by a wait for the device the policy is on (before: a CUDA-only
    ``torch.cuda.synchronize()`` of the current device)."""
    devices: list[torch.device] = []
    monkeypatch.setattr(timing, "synchronize", devices.append)
    histories = decode_bench.sample_histories(tiny_policy, 2, 3, seed=0)
    decode_bench.time_cell(tiny_policy, histories, k=2, repeats=1)
    assert devices == [tiny_policy.device] * 6  # three runs, a wait before and after each
