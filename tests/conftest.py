"""Shared fixtures: a tiny random catalog and data set, a tiny policy, the real data set.

Nothing is downloaded (HF_HUB_OFFLINE=1); models are built from a config with a
fixed seed. Tests that need ../shared/data skip with a stated reason on a fresh
clone, where that folder does not exist.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from models.policy import Policy  # noqa: E402
from models.sid_catalog import Item, SidCatalog, level_token  # noqa: E402
from training.data.dataset import RecDataset, Sample, load_dataset  # noqa: E402
from training.data.dataset_writer import write_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "valid", "test")
SHARED_DATA = Path(os.environ.get("VSTAR_SHARED_DATA", REPO.parent / "shared" / "data" / "amazon-industrial"))


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    """The CLI's ``logging.basicConfig`` inside a CliRunner binds a handler to a stream the runner then closes;
    later tests that log (httpx at INFO) would print 'Logging error' tracebacks. Put the root logger back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _restore_served_checkpoint() -> Iterator[None]:
    """``vstar serve`` hands its checkpoint to the app through ``os.environ["VSTAR_CHECKPOINT"]``, which a
    CliRunner does not put back: a later test that reads the settings from the environment would find it."""
    before = os.environ.get("VSTAR_CHECKPOINT")
    yield
    if before is None:
        os.environ.pop("VSTAR_CHECKPOINT", None)
    else:
        os.environ["VSTAR_CHECKPOINT"] = before


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny tensors (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    thread hand-offs cost more than the work on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_catalog(num_items: int = 120, codes: tuple[int, ...] = (6, 5, 5), seed: int = 0) -> SidCatalog:
    rng = random.Random(seed)
    items = {}
    for i in range(num_items):
        sid = tuple(level_token(lv, rng.randrange(c)) for lv, c in enumerate(codes))
        items[i] = Item(i, f"item {i}", sid)
    return SidCatalog(items, depth=len(codes))


def make_samples(catalog: SidCatalog, n: int, seed: int, prefix: str = "u") -> list[Sample]:
    rng = random.Random(seed)
    ids = sorted(catalog.items)
    out = []
    for u in range(n):
        hist = tuple(rng.choice(ids) for _ in range(rng.randrange(1, 8)))
        out.append(Sample(f"{prefix}{u}", hist, rng.choice(ids)))
    return out


@pytest.fixture(scope="session")
def tiny_catalog() -> SidCatalog:
    return make_catalog()


@pytest.fixture(scope="session")
def tiny_policy(tiny_catalog: SidCatalog) -> Policy:
    policy = Policy.from_preset("tiny", tiny_catalog, seed=0)
    policy.model.eval()
    return policy


def write_random_dataset(out: Path, catalog: SidCatalog, rows: tuple[int, int, int] = (200, 40, 40)) -> Path:
    """A data set folder over ``catalog``: random train / valid / test rows, unit-norm random embeddings."""
    pairs = zip(SPLITS, rows, strict=True)
    splits = {split: make_samples(catalog, n, seed) for seed, (split, n) in enumerate(pairs, 1)}
    meta = {i: {"title": it.title} for i, it in catalog.items.items()}
    emb = np.random.default_rng(0).normal(size=(catalog.num_items, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    write_dataset(out, catalog, splits, meta, emb)
    return out


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory, tiny_catalog: SidCatalog) -> Path:
    return write_random_dataset(tmp_path_factory.mktemp("tiny_data"), tiny_catalog)


@pytest.fixture(scope="session")
def tiny_dataset(tiny_data_dir: Path) -> RecDataset:
    return load_dataset(tiny_data_dir)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    if not (SHARED_DATA / "index.json").exists():
        pytest.skip(f"real data set not found at {SHARED_DATA} (a fresh clone has no ../shared; CI has it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_dataset(shared_data_dir: Path) -> RecDataset:
    return load_dataset(shared_data_dir)


def next_second() -> None:
    """Wait for the clock's next second. Event files are read in name order: the second the writer opened,
    host, pid, then a per-process writer count that sorts as text ("10" before "9"). A real resume is a later
    process; in one process within one second, the resumed run's file could sort first, depending on how many
    writers earlier tests opened."""
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.05)


class _FillingFile:
    """A file opened for writing on a disk that fills up: it takes half of a write, then fails with ENOSPC."""

    def __init__(self, file: Any) -> None:
        self.file = file

    def __enter__(self) -> _FillingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def write(self, data: Any) -> int:
        self.file.write(data[: len(data) // 2])
        self.file.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def disk_fills_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file a ``Path`` opens for writing from now on (``write_text``, ``write_bytes``, ``open("w")``) takes
    half of what is written and then fails as a full disk does: a write cut short, as Ctrl-C may cut it too."""
    real_open = Path.open

    def open_filling(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        file = real_open(self, mode, *args, **kwargs)
        return _FillingFile(file) if any(c in mode for c in "wax") else file

    monkeypatch.setattr(Path, "open", open_filling)
