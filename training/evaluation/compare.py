"""Paired comparison of two recommenders on the same rows, with bootstrap confidence intervals.

``vstar eval`` (and the baselines) store each row's target rank (``target_ranks``:
0-based, null when the target is not in the list). Two methods scored on the
same split are compared row by row: each row's HR@K / NDCG@K under the other
method minus under the base, so the row-to-row spread that both share cancels.
With several seeds per method, a row's figure is its mean over the method's
seeds; the bootstrap then resamples rows (``samples`` draws, seeded), and the
interval is the percentile interval of the mean difference. It measures how
sure the difference is over *rows*; the spread over seeds is the seeds' std
reported beside it (``base_seeds`` / ``other_seeds``: mean and sample std over seeds,
ddof 1, so n - 1 in the denominator; 0 for one seed).
The relative interval is that interval divided by the base's mean: the
base's own uncertainty is not in it. A ratio bootstrap (the relative
difference computed in each draw) is a little wider where the base is small:
pop against the count model on test, HR@1: +66.5% to +99.0%
here against +62.4% to +107.3%; at the README's sizes the two differ by at
most 0.4 points (HR@1 -22.7% to -14.2% here, -22.3% to -14.3% by ratio).
A metric that some file records as null (a cut-off beyond its ranked lists,
``vstar eval --beams 5`` and HR@10: ``training.evaluation.metrics``) is null in
the comparison too: its ranks cannot say who did better there. A file
whose metrics lack one of the compared metrics is refused, naming it: its
ranks alone cannot say whether that cut-off was measured.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DRAW_ELEMENTS = 1 << 22  # row indices drawn at once (32 MiB of them): the bootstrap's memory, whatever --samples
METRICS = ("HR@1", "HR@3", "HR@5", "HR@10", "NDCG@3", "NDCG@5", "NDCG@10")


def row_metric(ranks: np.ndarray, name: str) -> np.ndarray:
    """Per-row HR@K or NDCG@K from 0-based target ranks (-1: not ranked)."""
    kind, k = name.split("@")
    hit = (ranks >= 0) & (ranks < int(k))
    if kind == "HR":
        return hit.astype(float)
    return np.where(hit, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)


def read_run(path: Path) -> dict[str, Any]:
    """One eval (or baseline) JSON file; a ``ValueError`` naming it when it is unreadable or not one."""
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as e:  # not UTF-8, not JSON, past the JSON reader's limits
        raise ValueError(f"{path}: not a readable JSON file: {e}") from None
    if not isinstance(payload, dict) or "target_ranks" not in payload:
        raise ValueError(f"{path} has no target_ranks (written by an older vstar eval, or not an eval file)")
    ranks = payload["target_ranks"]
    if not isinstance(ranks, list) or not ranks:
        raise ValueError(f"{path}: target_ranks is not a non-empty list (one rank per row scored)")
    bad = next((r for r in ranks if r is not None and (type(r) is not int or not 0 <= r < 2**63)), None)
    if bad is not None:
        raise ValueError(f"{path}: target_ranks holds {bad!r}; a rank is a 0-based integer, or null when not ranked")
    rows = payload.get("rows", len(ranks))
    if type(rows) is not int or rows != len(ranks):
        raise ValueError(f"{path}: rows is {rows!r} but target_ranks holds {len(ranks)} ranks (one per row scored)")
    odd = next((k for k in ("split", "rows_fingerprint") if k in payload and not isinstance(payload[k], str)), None)
    if odd is not None:
        raise ValueError(f"{path}: {odd} is {payload[odd]!r}, not a string")
    metrics = payload.get("metrics")
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: metrics is not an object of metric -> figure")
    # a metric the file does not record cannot be told measured from not (a cut-off beyond its lists):
    # compared from the ranks alone, a --beams 5 file would lose HR@10 by every target ranked 5 to 9
    absent = [name for name in METRICS if name not in metrics]
    if absent:
        raise ValueError(f"{path}: metrics has no {', '.join(absent)} (a figure, or null where not measured)")
    bad_figure = next((name for name in METRICS if type(metrics[name]) not in (int, float, type(None))), None)
    if bad_figure is not None:
        raise ValueError(f"{path}: metrics {bad_figure} is {metrics[bad_figure]!r}, not a figure or null")
    return payload


def check_same_rows(runs: dict[Path, dict[str, Any]]) -> None:
    """Every run scored the same rows: the same split and, where the files record them, the same rows in order."""
    for key, what in (("split", "splits"), ("rows_fingerprint", "rows")):
        seen = {str(p): payload[key] for p, payload in runs.items() if key in payload}
        if len(set(seen.values())) > 1:
            listed = "; ".join(f"{p}: {v if key == 'split' else v[:12]}" for p, v in seen.items())
            raise ValueError(f"the runs scored different {what} ({listed}): compare runs over the same rows")
    unchecked = [str(p) for p, payload in runs.items() if "rows_fingerprint" not in payload]
    if unchecked:
        log.warning(
            "%s record no rows_fingerprint (written before vstar recorded one, or by hand): their rows are taken to "
            "be the others', in the same order, unchecked",
            ", ".join(unchecked),
        )


def stack_ranks(paths: Sequence[Path], runs: dict[Path, dict[str, Any]]) -> np.ndarray:
    """(seeds, rows) target ranks of the files ``paths`` among the read ``runs``; -1 where not ranked."""
    ranks = [[-1 if r is None else int(r) for r in runs[path]["target_ranks"]] for path in paths]
    if len({len(r) for r in ranks}) != 1:
        raise ValueError(f"the runs {', '.join(map(str, paths))} scored different numbers of rows")
    return np.asarray(ranks)


def load_ranks(paths: Sequence[Path]) -> np.ndarray:
    """(seeds, rows) target ranks from eval JSON files of one method; -1 where not ranked."""
    return stack_ranks(paths, {path: read_run(path) for path in paths})


def seed_spread(runs: np.ndarray, name: str) -> dict[str, float]:
    """Mean and std (n - 1) over a method's seeds of its whole-split figure; std 0 for one seed."""
    per_seed = np.array([row_metric(r, name).mean() for r in runs])
    std = float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0
    return {"mean": round(float(per_seed.mean()), 4), "std": round(std, 4), "seeds": len(per_seed)}


def seeds_mean(runs: np.ndarray, name: str) -> np.ndarray:
    """Each row's figure ``name``, its mean over the (seeds, rows) ``runs``."""
    return np.mean([row_metric(r, name) for r in runs], axis=0)


def bootstrap_means(diffs: dict[str, np.ndarray], rows: int, samples: int, seed: int) -> dict[str, np.ndarray]:
    """Each of ``diffs``' mean over ``samples`` draws of ``rows`` rows with replacement, the same draws for every
    one. The draws are made ``DRAW_ELEMENTS`` at a time, not as one (samples, rows) array: ``--samples 100000``
    over 4,533 rows would hold 3.6 GB of them, and as much again per metric's draw. A seed gives the same draws,
    and so the same figures, in blocks as at once (the generator's stream does not depend on the blocks)."""
    rng = np.random.default_rng(seed)
    out = {name: np.empty(samples) for name in diffs}
    block = max(1, DRAW_ELEMENTS // max(rows, 1))
    for start in range(0, samples, block):
        draws = rng.integers(0, rows, size=(min(block, samples - start), rows))
        for name, diff in diffs.items():
            out[name][start : start + len(draws)] = diff[draws].mean(axis=1)
    return out


def paired_bootstrap(
    base: np.ndarray, other: np.ndarray, metrics: Sequence[str] = METRICS, samples: int = 2000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Mean difference (other - base), relative to base, and its 95% bootstrap interval, per metric."""
    if base.shape[1] != other.shape[1]:
        raise ValueError(f"base scored {base.shape[1]} rows and other {other.shape[1]}: compare the same split")
    means = {name: (seeds_mean(base, name), seeds_mean(other, name)) for name in metrics}
    boots = bootstrap_means({name: o - b for name, (b, o) in means.items()}, base.shape[1], samples, seed)
    out: dict[str, dict[str, Any]] = {}
    for name, (b, o) in means.items():
        diff = o - b
        lo, hi = np.percentile(boots[name], [2.5, 97.5])
        base_mean = float(b.mean())
        scale = 1.0 / base_mean if base_mean > 0 else None  # relative figures: fractions of the base's mean
        out[name] = {
            "base_seeds": seed_spread(base, name),
            "other_seeds": seed_spread(other, name),
            "base": round(base_mean, 4),
            "other": round(float(o.mean()), 4),
            "diff": round(float(diff.mean()), 4),
            "ci95": [round(float(lo), 4), round(float(hi), 4)],
            # a base of 0 has no relative figures: null (JSON has no NaN)
            "relative": None if scale is None else round(float(diff.mean()) * scale, 4),
            "relative_ci95": None if scale is None else [round(float(lo) * scale, 4), round(float(hi) * scale, 4)],
        }
    return out


def unmeasured(runs: dict[Path, dict[str, Any]]) -> set[str]:
    """The metrics some run's file records as null: cut-offs beyond its ranked lists."""
    return {name for payload in runs.values() for name, value in payload.get("metrics", {}).items() if value is None}


# (split, rows, rows_fingerprint) of the compared files -> what the segments are, and each one's row indices
Segmenter = Callable[[str | None, int, str | None], tuple[dict[str, Any], dict[str, list[int]]]]
MIN_SEGMENT_ROWS = 30  # a segment with fewer rows is listed with its size alone: its interval would say little


def compare_runs(
    base: Sequence[Path], other: Sequence[Path], samples: int = 2000, seed: int = 0, by: Segmenter | None = None
) -> dict[str, Any]:
    """The paired comparison (module doc); with ``by`` (``training.evaluation.segments``), the same within each
    segment of the rows too, under ``segments``."""
    for side, paths in (("--base", base), ("--other", other)):
        named = [Path(p).resolve() for p in paths]
        twice = sorted({str(p) for p in named if named.count(p) > 1})
        if twice:  # one run counted as two seeds would shrink the seeds' std and weigh that run double
            raise ValueError(f"{side} names {', '.join(twice)} more than once: give each seed's file once")
    runs = {path: read_run(path) for path in [*base, *other]}  # each file read once
    check_same_rows(runs)
    base_ranks, other_ranks = stack_ranks(base, runs), stack_ranks(other, runs)
    missing = unmeasured(runs)
    measured = [name for name in METRICS if name not in missing]
    compared = paired_bootstrap(base_ranks, other_ranks, measured, samples=samples, seed=seed)
    out: dict[str, Any] = {
        "base": [str(p) for p in base],
        "other": [str(p) for p in other],
        "rows": int(base_ranks.shape[1]),
        "bootstrap_samples": samples,
        "bootstrap_seed": seed,
        "metrics": {name: compared.get(name) for name in METRICS},  # None: not measured by every file
    }
    if by is not None:
        first = runs[base[0]]  # check_same_rows: every file scored these rows
        description, segments = by(first.get("split"), out["rows"], first.get("rows_fingerprint"))
        blocks: dict[str, dict[str, Any]] = {}
        for name, rows in segments.items():
            if len(rows) < MIN_SEGMENT_ROWS:
                blocks[name] = {"rows": len(rows), "metrics": None}
                continue
            within = paired_bootstrap(base_ranks[:, rows], other_ranks[:, rows], measured, samples, seed)
            blocks[name] = {"rows": len(rows), "metrics": {name: within.get(name) for name in METRICS}}
        out["segments"] = description | {"min_rows": MIN_SEGMENT_ROWS, "segments": blocks}
    return out
