"""Semantic IDs for a new catalog: balanced residual k-means over item embeddings.

``vstar sids --data DIR`` reads ``DIR/item_emb.npy`` (row i = item i) and writes
an ``index.json`` of ``levels`` tokens per item (``--update-splits``: and
rewrites the split files' SID columns to it); ``vstar synth`` calls the same
builder. The index and the split files are each written in full under a
temporary name and renamed onto the old ones only once all are written, so a
failed write (a full disk) leaves every old file as it was. Design decisions:

- Residual quantisation with one shared codebook per level (as RQ-VAE and
  MiniOneRec's RQ-Kmeans): level l clusters the residuals left by levels < l, so
  a SID's prefix is a coarse-to-fine path and the tokens of level l mean the same
  thing under every prefix.
- Balanced codebooks by capacity-constrained assignment: every code takes at most
  ``ceil(N / C)`` items. Each Lloyd step assigns in rounds: items propose their
  nearest open code, each code keeps its closest proposers up to its free
  capacity, the rest retry without the codes that filled. This is greedy, not an
  optimal transport solve, but exact on the bound and vectorised. Codes left
  empty during the iterations are reseeded on the worst-fit items, so usage stays
  near 100% (unlike plain RQ-VAE, whose first level used 48 of 256 codes on the
  Industrial index).
- Collision rule: of the items that land on the same SID, the one it
  reconstructs best keeps it; each other one moves to the nearest last-level
  code not used under its (levels-1)-prefix, as RQ-VAE-based recommenders do.
  When that prefix is full (it has more items than C), the item climbs to the
  longest prefix with a free SID below it and descends greedily, level by level,
  into the nearest subtree with room, so it changes as few trailing tokens as
  possible. A first-level code holds at most ``ceil(N / C) <= C ** (levels-1)``
  items, so the first token never changes and every SID is unique whenever
  ``N <= C ** levels`` (checked up front). The codes of deeper levels take the moved
  items beyond the k-means' bound, so the report's ``codebook_usage`` (of the
  resolved codes) may show more than ``ceil(N / C)`` items on a code there: on
  amazon-industrial's 3,686 items at C = 64, up to 76 at the last level (58 is
  the bound; no item moved above the last level, so the second kept it). Sharing
  stays legal downstream (the catalog is one SID -> many items everywhere); it
  only happens here if ``resolve_collisions`` is handed more items than SIDs.
- The default codebook size is the smallest power of two whose square covers the
  catalog (4 to 256), e.g. 32 for 600 items and 64 for the 3,686 Industrial
  items: a small vocabulary in which a (levels-1)-prefix rarely overflows, so
  nearly all collisions resolve at the last level.
- Plain numpy (no sklearn in the environment); k-means++ initialisation from a
  seeded generator, so a seed fixes the index.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from models.atomic_folder import replacing_files
from models.output_path import parents_problem
from models.sid_catalog import LEVEL_PREFIXES, MAX_CODES, level_token
from training.data.data_files import DataError, read_embeddings
from training.data.dataset import SPLITS
from training.data.dataset_writer import relabel_splits
from training.data.item_embed import item_entries

MAX_AUTO_CODEBOOK = 256
MAX_NORM = 1e18  # a row's L2 norm: squared distances of rows and residuals stay far below float32's 3.4e38


@dataclass(frozen=True)
class SidBuildConfig:
    codebook_size: int | None = None  # codes per level; None: auto_codebook_size(N, levels)
    levels: int = 3
    iters: int = 20  # Lloyd iterations per level (stops early once assignments are stable)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.codebook_size is not None and not 2 <= self.codebook_size <= MAX_CODES:
            raise ValueError(
                f"codebook size must be 2..{MAX_CODES:,} (the decoders' tables are as wide), got {self.codebook_size}"
            )
        if not 1 <= self.levels <= len(LEVEL_PREFIXES):
            raise ValueError(f"levels must be in 1..{len(LEVEL_PREFIXES)}, got {self.levels}")
        if self.iters < 1:
            raise ValueError(f"iters must be at least 1, got {self.iters}")


@dataclass(frozen=True)
class SidBuild:
    codes: np.ndarray  # (N, levels) int64, the resolved codes
    codebooks: np.ndarray  # (levels, C, D) float32
    report: dict[str, Any]

    def index(self) -> dict[str, list[str]]:
        """MiniOneRec's ``index.json`` shape: ``{"0": ["<a_1>", "<b_2>", "<c_3>"]}``."""
        return {str(i): [level_token(lv, int(c)) for lv, c in enumerate(row)] for i, row in enumerate(self.codes)}


def auto_codebook_size(num_items: int, levels: int = 3) -> int:
    """Smallest power of two ``C`` with ``C * C >= num_items``, clamped to 4..256; then doubled until ``levels``
    levels of it name every item (``C ** levels >= num_items``: one level needs a code per item)."""
    size = 4
    while size * size < num_items and size < MAX_AUTO_CODEBOOK:
        size *= 2
    while size**levels < num_items:
        size *= 2
    return size


def _sq_dist(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] - 2.0 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
    return np.maximum(d, 0.0)  # (N, C)


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centroids = np.empty((k, x.shape[1]), dtype=x.dtype)
    centroids[0] = x[rng.integers(len(x))]
    closest = _sq_dist(x, centroids[:1])[:, 0]  # (N,)
    norms = (x * x).sum(1)  # (N,)
    for j in range(1, k):
        total = closest.sum()
        # fewer distinct points than codes: duplicates are fine, capacity spreads the items
        pick = rng.integers(len(x)) if total <= 0 else rng.choice(len(x), p=closest / total)
        c = centroids[j] = x[pick]
        # |x - c|^2 by one matrix-vector product, as _sq_dist: (x - c) ** 2 wrote two (N, D) temporaries per code,
        # half of vstar sids' time at 50,000 items
        closest = np.minimum(closest, np.maximum(norms - 2.0 * (x @ c) + c @ c, 0.0))
    return centroids


def balanced_assign(dist: np.ndarray, capacity: int) -> np.ndarray:
    """Assign each row of ``dist`` (N, C) to a column, at most ``capacity`` rows per column."""
    n, k = dist.shape
    assert capacity * k >= n, "capacity too small for the items"
    codes = np.full(n, -1, dtype=np.int64)
    load = np.zeros(k, dtype=np.int64)
    pending = np.arange(n)
    while pending.size:
        d = dist[pending]  # (U, C) copy
        d[:, load >= capacity] = np.inf
        choice = d.argmin(axis=1)
        best = d[np.arange(len(pending)), choice]
        order = np.lexsort((best, choice))  # by code, then closest first
        chosen = choice[order]
        rank = np.arange(len(order)) - np.searchsorted(chosen, chosen)
        accept = rank < capacity - load[chosen]
        codes[pending[order[accept]]] = chosen[accept]
        load += np.bincount(chosen[accept], minlength=k)
        pending = pending[order[~accept]]
    return codes


def balanced_kmeans(
    x: np.ndarray, k: int, iters: int, rng: np.random.Generator, done: Callable[[int], object] = lambda n: None
) -> tuple[np.ndarray, np.ndarray]:
    """Capacity-constrained k-means: returns (centroids (k, D), codes (N,)), each code <= ceil(N/k) items.
    ``done(n)`` is told of each finished step, of ``1 + iters`` (the initialisation, then each iteration; those
    left when it converges early, at once)."""
    capacity = -(-len(x) // k)
    centroids = _kmeans_pp(x, k, rng)
    done(1)
    codes = np.full(len(x), -1, dtype=np.int64)
    for it in range(iters):
        new_codes = balanced_assign(_sq_dist(x, centroids), capacity)
        stable = np.array_equal(new_codes, codes)
        codes = new_codes
        counts = np.bincount(codes, minlength=k)
        used = counts > 0
        starts = np.cumsum(counts) - counts
        # sorted segment sums: far faster than np.add.at, and steadier than a one-hot matmul on a busy BLAS
        sums = np.add.reduceat(x[np.argsort(codes, kind="stable")], starts[used], axis=0)  # (used, D)
        centroids[used] = sums / counts[used, None]
        if stable:
            done(iters - it)
            break
        done(1)
        empty = np.flatnonzero(~used)
        if empty.size:  # reseed on the items worst served by their centroid
            fit = ((x - centroids[codes]) ** 2).sum(1)
            worst = np.argsort(-fit, kind="stable")[: empty.size]  # fewer items than codes: some stay empty
            centroids[empty[: worst.size]] = x[worst]
    return centroids, codes


def _free_depth(sid: tuple[int, ...], occupied: Counter[tuple[int, ...]], k: int) -> int | None:
    """The longest prefix of ``sid`` whose subtree still has a free SID; None when the index is full."""
    levels = len(sid)
    return next((d for d in range(levels - 1, -1, -1) if occupied[sid[:d]] < k ** (levels - d)), None)


def _descend(
    residual: np.ndarray, prefix: tuple[int, ...], codebooks: np.ndarray, occupied: Counter[tuple[int, ...]]
) -> tuple[int, ...]:
    """Greedy path below ``prefix`` to a free SID: at each level the nearest code whose subtree has room."""
    levels, k, _ = codebooks.shape
    path = prefix
    for level in range(len(prefix), levels):
        room = k ** (levels - level - 1)  # SIDs under one child
        order = np.argsort(((residual - codebooks[level]) ** 2).sum(1), kind="stable")  # (C,)
        code = next(int(c) for c in order if occupied[path + (int(c),)] < room)
        path, residual = (*path, code), residual - codebooks[level][code]
    return path


def resolve_collisions(codes: np.ndarray, x: np.ndarray, codebooks: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """Give items that share a SID free SIDs, changing as few trailing tokens as possible.

    ``x`` (N, D) are the embeddings, ``codebooks`` (L, C, D). The item best
    reconstructed by a shared SID keeps it; each other one (best-fitting first)
    takes the nearest free last-level code under its (L-1)-prefix, or, when that
    prefix is full, climbs to the longest prefix with room and descends greedily.
    Returns the new codes and counts of moved items.
    """
    levels, k, _ = codebooks.shape
    codes = codes.copy()
    error = ((x - codebooks[np.arange(levels), codes].sum(1)) ** 2).sum(1)  # (N,) reconstruction error
    occupied: Counter[tuple[int, ...]] = Counter()  # distinct SIDs under every prefix
    for sid in {tuple(row) for row in codes.tolist()}:
        occupied.update(sid[:d] for d in range(levels + 1))
    keepers: set[tuple[int, ...]] = set()
    movers = []
    for i in sorted(range(len(codes)), key=lambda i: (error[i], i)):
        sid = tuple(codes[i].tolist())
        if sid in keepers:
            movers.append(i)
        keepers.add(sid)
    counts = {"moved_items": 0, "moved_above_last_level": 0}
    for i in movers:
        sid = tuple(codes[i].tolist())
        depth = _free_depth(sid, occupied, k)
        if depth is None:  # more items than SIDs: it keeps sharing
            continue
        prefix = sid[:depth]
        new = _descend(x[i] - codebooks[np.arange(depth), list(prefix)].sum(0), prefix, codebooks, occupied)
        occupied.update(new[:d] for d in range(levels + 1))
        codes[i] = new
        counts["moved_items"] += 1
        counts["moved_above_last_level"] += depth < levels - 1
    return codes, counts


def collision_stats(codes: np.ndarray) -> dict[str, float | int]:
    """Distinct SIDs, the collision rate ``1 - distinct / N`` and how many items share a SID."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    distinct = len(counts)
    return {
        "distinct_sids": distinct,
        "collision_rate": round(1.0 - distinct / len(codes), 6),
        "items_sharing_a_sid": int((counts[inverse.reshape(-1)] > 1).sum()),
    }


def level_usage(codes: np.ndarray, codebook_size: int) -> list[dict[str, float | int]]:
    """Per level: codes used, their share of the codebook, items per used code, normalised entropy."""
    out = []
    for level in range(codes.shape[1]):
        counts = np.bincount(codes[:, level], minlength=codebook_size)
        used = counts[counts > 0]
        p = used / used.sum()
        out.append(
            {
                "level": level + 1,
                "codes_used": int(used.size),
                "usage": round(used.size / codebook_size, 4),
                "max_items_per_code": int(used.max()),
                "min_items_per_code": int(used.min()),
                "entropy": round(float(-(p * np.log(p)).sum() / math.log(codebook_size)), 4),
            }
        )
    return out


def build_sids(embeddings: np.ndarray, config: SidBuildConfig, progress: bool = False) -> SidBuild:
    """Balanced residual k-means SIDs for ``embeddings`` (N, D), collisions resolved; ``progress``: a bar over
    the k-means steps (minutes at a million items)."""
    if embeddings.ndim != 2 or embeddings.shape[0] < 1 or embeddings.shape[1] < 1:
        raise ValueError(f"embeddings must be a non-empty (items, dim) matrix, got shape {embeddings.shape}")
    if not np.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or infinite values")
    norm = float(np.sqrt(np.square(embeddings, dtype=np.float64).sum(1).max()))
    if norm > MAX_NORM:  # squared distances in float32 overflow to inf and nan: a numpy traceback in k-means++
        raise ValueError(f"embeddings too large for float32 distances (a row's norm is {norm:.3g}, above "
                         f"{MAX_NORM:.0e}): scale them down, e.g. L2-normalise the rows")  # fmt: skip
    n = embeddings.shape[0]
    k = config.codebook_size or auto_codebook_size(n, config.levels)
    if k > MAX_CODES:
        raise ValueError(
            f"{n:,} items at {config.levels} level(s) need {k:,} codes a level, more than the decoders take "
            f"({MAX_CODES:,}): use more --levels"
        )
    if k**config.levels < n:
        raise ValueError(
            f"codebook too small: {k}^{config.levels} = {k**config.levels} SIDs for {n} items; "
            f"use --codebook-size >= {math.ceil(n ** (1 / config.levels))} or more levels"
        )
    start = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    residual = embeddings.astype(np.float32)
    codes = np.empty((n, config.levels), dtype=np.int64)
    codebooks = np.empty((config.levels, k, embeddings.shape[1]), dtype=np.float32)
    bar = tqdm(total=config.levels * (1 + config.iters), desc="sids: k-means", disable=not progress, leave=False)
    for level in range(config.levels):
        bar.set_postfix(level=f"{level + 1}/{config.levels}")
        codebooks[level], codes[:, level] = balanced_kmeans(residual, k, config.iters, rng, bar.update)
        residual = residual - codebooks[level][codes[:, level]]
    bar.close()
    before = collision_stats(codes)
    resolved, moved = resolve_collisions(codes, embeddings.astype(np.float32), codebooks)
    report = {
        "items": n,
        "dim": int(embeddings.shape[1]),
        "levels": config.levels,
        "codebook_size": k,
        "seed": config.seed,
        "before": before,
        "after": collision_stats(resolved),
        **moved,
        "codebook_usage": level_usage(resolved, k),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return SidBuild(resolved, codebooks, report)


def load_embeddings(data_dir: Path) -> np.ndarray:
    """Read ``DIR/item_emb.npy`` and check it against ``DIR/item.json`` when that exists: as many items, with ids
    0..N-1 (the index names row i's item i)."""
    path = data_dir / "item_emb.npy"
    meta = data_dir / "item.json"
    if not path.exists():
        how = f": vstar embed --data {data_dir} --encoder PATH writes it from item.json's text" if meta.exists() else ""
        raise DataError(f"{path}: file not found (vstar sids needs item embeddings, row i = item id i){how}")
    items = len(item_entries(meta)) if meta.exists() else None
    return read_embeddings(path, items, str(meta))


def split_csvs(folder: Path) -> list[str]:
    """The names of the split CSVs in ``folder`` (whose SID columns follow its index.json)."""
    return [f"{s}.csv" for s in SPLITS if (folder / f"{s}.csv").is_file()]


def index_out_problem(out: Path) -> str | None:
    """What stops ``--out`` taking a new index (a sentence), or None: it may replace only an index that no
    data set's splits or checkpoint depends on."""
    if out.is_dir():
        return f"{out} is a folder: give the path of the index.json to write"
    if (out.parent / "manifest.json").is_file():
        return f"{out} is inside {out.parent}, a checkpoint (it holds manifest.json)"
    if out.exists() and not out.name.endswith("index.json"):
        return f"{out} exists and is not an index (its name does not end in index.json); it would be replaced"
    splits = split_csvs(out.parent)
    if splits:
        return (
            f"{out.parent} is a data set ({', '.join(splits)}) whose SIDs must match its own index: give it as "
            "--data with --force --update-splits instead"
        )
    return parents_problem(out)


def write_index(
    data_dir: Path, config: SidBuildConfig, out: Path | None = None, force: bool = False, update_splits: bool = False
) -> dict[str, Any]:
    """Build SIDs from ``data_dir/item_emb.npy`` and write ``index.json`` (default ``data_dir/index.json``);
    ``update_splits``: also rewrite the SID columns of the split files beside it to the new index."""
    own = data_dir / "index.json"
    out = out or own
    is_own = out.resolve() == own.resolve()
    if update_splits and not is_own:
        raise ValueError(f"--update-splits rewrites the splits of {data_dir}, whose index is {own}, not {out}")
    problem = parents_problem(out) if is_own else index_out_problem(out)  # found now, not after the k-means
    if problem is not None:
        raise ValueError(f"{'--data' if is_own else '--out'}: {problem}")
    if out.exists() and not force:
        raise FileExistsError(
            f"{out} exists; the CSVs next to it carry SIDs that must match it, so a new index would make "
            "them inconsistent. Write elsewhere with --out, or pass --force --update-splits to rewrite the "
            "CSVs' SID columns with it."
        )
    csvs = split_csvs(data_dir)
    if is_own and out.exists() and csvs and not update_splits:
        raise FileExistsError(
            f"--force alone would replace {out} while {', '.join(csvs)} beside it keep the old SIDs, and the data "
            "set would no longer load: add --update-splits to rewrite their SID columns with it, or write "
            "elsewhere with --out"
        )
    if is_own and csvs and not update_splits:  # no index yet: the splits' SID columns are empty, or another's
        raise ValueError(
            f"{', '.join(csvs)} in {data_dir} carry SID columns that a new {out.name} would not match (a new "
            "catalog's are empty), and the data set would not load: add --update-splits to fill them with it, or "
            "write elsewhere with --out"
        )
    build = build_sids(load_embeddings(data_dir), config, progress=True)
    index = build.index()
    splits = relabel_splits(data_dir, index) if update_splits else []  # all checked before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing_files([*(split.path for split in splits), out]) as files:  # all written before any is renamed
        for split, f in zip(splits, files[:-1], strict=True):
            split.write(f)
        files[-1].write(json.dumps(index).encode())
    return build.report | {"out": str(out), "splits_updated": [str(split.path) for split in splits]}
