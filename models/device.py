"""Which torch devices this machine can run the models on, checked before any model is loaded.

Shared by the command line (``--device``) and the service (``VSTAR_DEVICE``),
so that a device the machine lacks is one clear line in both, not a traceback
from the first tensor moved there.
"""

from __future__ import annotations

import torch

DEVICE_TYPES = ("cpu", "cuda", "mps")


def device_problem(name: str) -> str | None:
    """What is wrong with running on the device ``name`` here (a sentence), or None when it is usable."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"{name!r} is not a torch device (cpu, cuda, cuda:1, ...)"
    if device.type not in DEVICE_TYPES:
        return f"{name}: the models run on cpu, cuda (cuda:N) or mps devices"
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            return f"{name}: no CUDA device here (torch {torch.__version__}, {built})"
        if device.index is not None and device.index >= count:
            return f"{name}: this machine has {count} CUDA device(s), cuda:0 .. cuda:{count - 1}"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"{name}: MPS is not available here"
    return None


def synchronize(device: torch.device) -> None:
    """Wait until the work queued on ``device`` has run: CUDA and MPS kernels run asynchronously, so a clock read
    right after a call that queued them times the queueing, not the work. Nothing to wait for on the CPU.

    The device is named: ``torch.cuda.synchronize()`` without one waits for the current device only (cuda:0
    unless set), not for a model on cuda:1.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
