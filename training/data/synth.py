"""A synthetic recommendation data set in the project's folder layout (``vstar synth``).

It is the embedded default that lets the project run end to end on a fresh
machine, so it takes seconds and depends on nothing but numpy. Design decisions:

- Catalog: a fixed three-level taxonomy (department > category > product type,
  6 x 3 x 3 leaves) drawn from the Industrial & Scientific domain, so titles read
  like the real data ("Kestrel Heavy-Duty Cordless Drill KS-4821"). Items go to
  leaves with Zipf-like leaf sizes; each item has a brand, a modifier and a model
  number. ``item.json`` carries title, description, brand and ``categories``
  (``"Power Tools > Drills > Cordless Drill"``).
- Embeddings: nested Gaussians (department centre + category offset + leaf
  offset + item noise, shrinking scales), L2-normalised float32, so the residual
  k-means SIDs (training.data.sid_builder) recover the hierarchy coarse to fine.
- Users: a Markov process per user whose tastes drift. Each next item is, in
  order of the draw: one of the last item's fixed "complements" (item-to-item
  transitions, the signal a sequence model can learn), another item of the same
  leaf, an item of a sibling leaf, or a jump to a department drawn from the
  user's taste. The taste is a softmax over departments whose logits take a
  random walk at every step, and departments trend up or down over global time.
  Items are popularity-weighted (Zipf within a leaf); a user never repeats an
  item.
- Split as MiniOneRec: per-user time-sorted sequences, a sliding window of at
  most 10 history items, all samples sorted by target timestamp, then 80/10/10.
  Timestamps are not a CSV column (MiniOneRec has none); ``SynthData.times``
  keeps them for tests.
- SIDs come from ``training.data.sid_builder`` on the embeddings, as for any new
  catalog; the whole run is deterministic for a seed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.atomic_folder import publish, staging_folder
from models.output_path import replaced_folder_problem
from models.sid_catalog import Item, SidCatalog
from training.data.dataset import Sample
from training.data.dataset_writer import split_ends, split_stats, write_dataset, written_by
from training.data.sid_builder import SidBuildConfig, build_sids

MAX_HISTORY = 10  # MiniOneRec's sliding window

TAXONOMY: dict[str, dict[str, list[str]]] = {
    "Power Tools": {
        "Drills": ["Cordless Drill", "Hammer Drill", "Impact Driver"],
        "Saws": ["Circular Saw", "Jigsaw", "Reciprocating Saw"],
        "Sanders": ["Orbital Sander", "Belt Sander", "Detail Sander"],
    },
    "Hand Tools": {
        "Wrenches": ["Socket Set", "Torque Wrench", "Adjustable Wrench"],
        "Pliers": ["Needle-Nose Pliers", "Locking Pliers", "Wire Stripper"],
        "Measuring": ["Tape Measure", "Digital Caliper", "Spirit Level"],
    },
    "Electrical": {
        "Wiring": ["Electrical Tape", "Wire Connector Kit", "Heat Shrink Tubing"],
        "Testers": ["Digital Multimeter", "Voltage Tester", "Clamp Meter"],
        "Lighting": ["LED Work Light", "Headlamp", "Flashlight"],
    },
    "Lab Supplies": {
        "Glassware": ["Beaker Set", "Erlenmeyer Flask", "Graduated Cylinder"],
        "Consumables": ["Nitrile Gloves", "Pipette Tips", "Petri Dishes"],
        "Instruments": ["Lab Scale", "Hot Plate Stirrer", "pH Meter"],
    },
    "3D Printing": {
        "Filament": ["PLA Filament", "PETG Filament", "TPU Filament"],
        "Printer Parts": ["Nozzle Kit", "Build Plate", "Extruder Upgrade"],
        "Resin": ["Standard Resin", "Tough Resin", "Resin Vat"],
    },
    "Safety": {
        "Eye Protection": ["Safety Glasses", "Face Shield", "Welding Goggles"],
        "Hearing Protection": ["Ear Plugs", "Ear Muffs", "Hearing Bands"],
        "Respiratory": ["Dust Mask", "Half Respirator", "Respirator Cartridges"],
    },
}
BRANDS = ["Kestrel", "Ironbark", "Vantor", "Northline", "Helix", "Corvo", "Quarry", "Lumen", "Apex Lab", "Tessel"]
MODIFIERS = ["Heavy-Duty", "Compact", "Professional", "Premium", "Industrial", "Lightweight", "Precision", "Economy"]
Leaf = tuple[str, str, str]  # (department, category, product type)


@dataclass(frozen=True)
class SynthConfig:
    items: int = 600
    users: int = 400
    seed: int = 0
    dim: int = 64  # embedding width
    min_events: int = 5  # per user, as a 5-core filter guarantees
    max_events: int = 20
    complements: int = 5  # fixed item-to-item successors per item
    # next-item mixture: complement of the last item, same leaf, sibling leaf; the rest jumps by taste
    p_complement: float = 0.4
    p_same_leaf: float = 0.2
    p_sibling: float = 0.15
    taste_drift: float = 0.35  # std of the per-step random walk of a user's department logits
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)

    def __post_init__(self) -> None:
        if self.users < 1:
            raise ValueError(f"--users must be at least 1, got {self.users}")
        if not 2 <= self.min_events <= self.max_events:
            raise ValueError(f"need 2 <= min_events <= max_events, got {self.min_events}, {self.max_events}")
        if self.items < self.min_events:
            raise ValueError(f"--items must be at least {self.min_events} (users never repeat items), got {self.items}")
        mix = (self.p_complement, self.p_same_leaf, self.p_sibling)
        if min(mix) < 0 or sum(mix) > 1:
            raise ValueError("p_complement, p_same_leaf and p_sibling must be >= 0 and sum to at most 1")
        if len(self.split) != 3 or abs(sum(self.split) - 1.0) > 1e-9 or min(self.split) < 0:
            raise ValueError(f"split must be three non-negative shares summing to 1, got {self.split}")


@dataclass
class SynthData:
    catalog: SidCatalog
    meta: dict[int, dict[str, str]]
    embeddings: np.ndarray  # (items, dim) float32, L2-normalised
    splits: dict[str, list[Sample]]
    times: dict[str, list[float]]  # target timestamp of every sample, parallel to splits
    leaf_of: np.ndarray  # (items,) leaf index into leaves
    leaves: list[Leaf]
    sid_report: dict[str, Any]


def _leaves() -> list[Leaf]:
    return [(d, c, t) for d, cats in TAXONOMY.items() for c, types in cats.items() for t in types]


def _catalog(
    cfg: SynthConfig, leaves: list[Leaf], rng: np.random.Generator
) -> tuple[np.ndarray, dict[int, dict[str, str]]]:
    """Leaf of every item (Zipf-like leaf sizes, every leaf used while items allow) and item.json entries."""
    weights = 1.0 / np.arange(1, len(leaves) + 1) ** 0.7
    first = rng.permutation(len(leaves))[: min(cfg.items, len(leaves))]
    rest = rng.choice(len(leaves), size=cfg.items - len(first), p=weights[rng.permutation(len(leaves))] / weights.sum())
    leaf_of = np.sort(np.concatenate([first, rest]))  # items of a leaf get neighbouring ids, like a crawl
    meta: dict[int, dict[str, str]] = {}
    for item, leaf in enumerate(leaf_of.tolist()):
        dept, cat, kind = leaves[leaf]
        brand, mod = BRANDS[rng.integers(len(BRANDS))], MODIFIERS[rng.integers(len(MODIFIERS))]
        model = f"{brand[:2].upper()}-{rng.integers(1000, 10000)}"
        meta[item] = {
            "title": f"{brand} {mod} {kind} {model}",
            "description": f"{mod} {kind.lower()} by {brand}, from the {cat.lower()} line of our {dept.lower()} range.",
            "brand": brand,
            "categories": f"{dept} > {cat} > {kind}",
        }
    return leaf_of, meta


def _embeddings(cfg: SynthConfig, leaves: list[Leaf], leaf_of: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Nested Gaussians: department + category + leaf + item, scales shrinking down the tree."""
    depts = sorted({d for d, _, _ in leaves})
    cats = sorted({(d, c) for d, c, _ in leaves})
    scale = 1.0 / np.sqrt(cfg.dim)
    dept_c = {d: rng.normal(0, 1.0 * scale, cfg.dim) for d in depts}
    cat_c = {k: dept_c[k[0]] + rng.normal(0, 0.6 * scale, cfg.dim) for k in cats}
    leaf_c = np.stack([cat_c[(d, c)] + rng.normal(0, 0.4 * scale, cfg.dim) for d, c, _ in leaves])
    emb = leaf_c[leaf_of] + rng.normal(0, 0.25 * scale, (len(leaf_of), cfg.dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32)


@dataclass(frozen=True)
class _World:
    """What every user's Markov process reads: items by leaf and department, popularity, complements."""

    leaf_items: list[np.ndarray]
    dept_items: list[np.ndarray]
    sibling_leaves: list[np.ndarray]
    popularity: np.ndarray  # (items,) positive weights
    complements: np.ndarray  # (items, complements) item ids
    leaf_of: np.ndarray
    dept_of_leaf: np.ndarray
    trend: np.ndarray  # (departments,) log-popularity slope over global time


def _world(cfg: SynthConfig, leaves: list[Leaf], leaf_of: np.ndarray, rng: np.random.Generator) -> _World:
    depts = sorted({d for d, _, _ in leaves})
    dept_of_leaf = np.array([depts.index(d) for d, _, _ in leaves])
    leaf_items = [np.flatnonzero(leaf_of == j) for j in range(len(leaves))]
    dept_items = [np.flatnonzero(dept_of_leaf[leaf_of] == d) for d in range(len(depts))]
    n = len(leaves)
    siblings = [np.array([k for k in range(n) if k != j and leaves[k][:2] == leaves[j][:2]]) for j in range(n)]
    popularity = rng.pareto(1.5, len(leaf_of)) + 0.2
    # complements: a leaf's "accessory" leaves (one in its department, one anywhere), items drawn by popularity
    related = [
        np.array([rng.choice(np.flatnonzero(dept_of_leaf == dept_of_leaf[j])), rng.integers(len(leaves))])
        for j in range(len(leaves))
    ]
    complements = np.empty((len(leaf_of), cfg.complements), dtype=np.int64)
    for item, leaf in enumerate(leaf_of):
        pool = np.concatenate([leaf_items[k] for k in related[leaf]] + [leaf_items[leaf]])
        pool = pool[pool != item]
        if pool.size == 0:  # tiny catalogs leave related leaves empty
            pool = np.delete(np.arange(len(leaf_of)), item)
        p = popularity[pool] / popularity[pool].sum()
        complements[item] = rng.choice(pool, size=cfg.complements, replace=len(pool) < cfg.complements, p=p)
    trend = rng.normal(0, 1.5, len(depts))
    return _World(leaf_items, dept_items, siblings, popularity, complements, leaf_of, dept_of_leaf, trend)


def _pick(pool: np.ndarray, w: _World, seen: set[int], rng: np.random.Generator) -> int | None:
    fresh = np.array([i for i in pool.tolist() if i not in seen], dtype=np.int64)
    if fresh.size == 0:
        return None
    p = w.popularity[fresh]
    return int(rng.choice(fresh, p=p / p.sum()))


def _taste_department(w: _World, logits: np.ndarray, t: float, rng: np.random.Generator) -> int:
    """A department drawn from the user's taste, shifted by each department's trend at global time ``t``."""
    z = np.where([d.size > 0 for d in w.dept_items], logits + w.trend * t, -np.inf)  # tiny catalogs miss departments
    p = np.exp(z - z.max())
    return int(rng.choice(len(z), p=p / p.sum()))


def _next_item(
    cfg: SynthConfig, w: _World, last: int, logits: np.ndarray, t: float, seen: set[int], rng: np.random.Generator
) -> int:
    leaf = int(w.leaf_of[last])
    r = rng.random()
    pool = np.array([], dtype=np.int64)  # empty: a jump by taste
    if r < cfg.p_complement:
        pool = w.complements[last]  # repeated complements weigh more, on top of popularity
    elif r < cfg.p_complement + cfg.p_same_leaf:
        pool = w.leaf_items[leaf]
    elif r < cfg.p_complement + cfg.p_same_leaf + cfg.p_sibling and w.sibling_leaves[leaf].size:
        pool = w.leaf_items[int(rng.choice(w.sibling_leaves[leaf]))]
    picked = _pick(pool, w, seen, rng)
    while picked is None:  # a jump by taste; also the fallback when the chosen pool is used up
        picked = _pick(w.dept_items[_taste_department(w, logits, t, rng)], w, seen, rng)
        if picked is None:
            picked = _pick(np.arange(len(w.leaf_of)), w, seen, rng)
    return picked


def _user_events(cfg: SynthConfig, w: _World, rng: np.random.Generator) -> tuple[list[int], list[float]]:
    n = int(rng.integers(cfg.min_events, min(cfg.max_events, len(w.leaf_of)) + 1))
    logits = rng.normal(0, 1.5, len(w.dept_items))
    t = float(rng.uniform(0.0, 0.75))  # global time runs over [0, 1] plus each user's tail
    first = _pick(w.dept_items[_taste_department(w, logits, t, rng)], w, set(), rng)
    assert first is not None, "departments without items have zero taste"
    items = [first]
    times = [t]
    for _ in range(n - 1):
        logits = logits + rng.normal(0, cfg.taste_drift, len(logits))
        t += float(rng.exponential(0.25 / cfg.max_events))
        items.append(_next_item(cfg, w, items[-1], logits, t, set(items), rng))
        times.append(t)
    return items, times


def _split(
    events: list[tuple[list[int], list[float]]], cfg: SynthConfig
) -> tuple[dict[str, list[Sample]], dict[str, list[float]]]:
    """Sliding windows over each user's sequence, sorted globally by target time, cut 80/10/10 as ``vstar import``'s."""
    rows: list[tuple[float, int, Sample]] = []
    for user, (items, times) in enumerate(events):
        for j in range(1, len(items)):
            rows.append((times[j], user, Sample(f"U{user}", tuple(items[max(0, j - MAX_HISTORY) : j]), items[j])))
    rows.sort(key=lambda r: (r[0], r[1]))
    train_end, valid_end = split_ends(len(rows), cfg.split)
    cuts = {"train": rows[:train_end], "valid": rows[train_end:valid_end], "test": rows[valid_end:]}
    return {s: [r[2] for r in part] for s, part in cuts.items()}, {s: [r[0] for r in part] for s, part in cuts.items()}


def generate(cfg: SynthConfig, sid_config: SidBuildConfig | None = None) -> SynthData:
    """The whole synthetic data set in memory; deterministic for ``cfg.seed``."""
    rng = np.random.default_rng(cfg.seed)
    leaves = _leaves()
    leaf_of, meta = _catalog(cfg, leaves, rng)
    embeddings = _embeddings(cfg, leaves, leaf_of, rng)
    world = _world(cfg, leaves, leaf_of, rng)
    events = [_user_events(cfg, world, rng) for _ in range(cfg.users)]
    splits, times = _split(events, cfg)
    build = build_sids(embeddings, sid_config or SidBuildConfig(seed=cfg.seed))
    index = build.index()
    catalog = SidCatalog({i: Item(i, meta[i]["title"], tuple(index[str(i)])) for i in meta})
    return SynthData(catalog, meta, embeddings, splits, times, leaf_of, leaves, build.report)


def write_synth(
    out: Path, cfg: SynthConfig, sid_config: SidBuildConfig | None = None, force: bool = False
) -> dict[str, Any]:
    """Write the data set to ``out`` in the folder layout, plus a ``stats.json``; returns the stats.

    Writes into a new or empty folder, or over a data set ``vstar synth`` wrote:
    regenerated as it was when the settings are its own, replaced by another only
    with ``force`` (checkpoints trained on it would no longer match it: their data
    fingerprint says so); refuses any other folder (a real data set, a checkpoint)
    and a file, so a typo in ``--out`` cannot clobber them. The folder is written beside
    ``out`` and moved there in one step (``models.atomic_folder``), so a failed or
    killed write leaves the old folder, or none: files without their ``stats.json``
    made the next ``vstar synth`` refuse the folder as one it did not write.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; --out is the folder to write the data set into")
    problem = replaced_folder_problem(out)  # found now, not once the data set was generated
    if problem is not None:
        raise ValueError(f"--out: {problem}")
    if out.is_dir() and any(out.iterdir()) and not written_by(out, "synthetic"):
        raise ValueError(
            f"{out} holds files that vstar synth did not write (a data set, a checkpoint?); choose a new --out"
        )
    earlier = _earlier_synth(out)
    settings = json.loads(json.dumps(asdict(cfg)))  # as stats.json holds them (tuples as lists)
    if earlier is not None and not force and earlier.get("config") != settings:  # before the work
        raise ValueError(_other_settings(out, earlier.get("config"), settings))
    data = generate(cfg, sid_config)
    stats = {
        "dataset": "synthetic",
        "config": asdict(cfg),
        "items": cfg.items,
        "users": cfg.users,
        **split_stats(data.splits),
        "leaves": len(data.leaves),
        "sids": {k: v for k, v in data.sid_report.items() if k != "seconds"},  # keeps the folder deterministic
    }
    if earlier is not None and not force and _sid_settings(earlier.get("sids")) != _sid_settings(stats["sids"]):
        raise ValueError(_other_settings(out, _sid_settings(earlier.get("sids")), _sid_settings(stats["sids"])))
    staged = staging_folder(out)
    try:
        write_dataset(staged, data.catalog, data.splits, data.meta, data.embeddings)
        (staged / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        changed = _changed_since(out, staged) if earlier is not None and not force else []
        if changed:  # its SIDs rebuilt by vstar sids, a file of the user's: what checkpoints may have used
            shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
            raise ValueError(
                f"{out} changed since vstar synth wrote it ({shown}): pass --force to replace it, or choose "
                "another --out"
            )
        publish(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return stats | {"out": str(out)}


def _changed_since(out: Path, staged: Path) -> list[str]:
    """The files of ``out`` that the data set written to ``staged`` (the same settings) would change or remove."""
    written = {p.name for p in staged.iterdir()}
    removed = [p.name for p in sorted(out.iterdir()) if p.name not in written]
    kept = [name for name in sorted(written) if (out / name).is_file()]
    differ = [name for name in kept if (out / name).read_bytes() != (staged / name).read_bytes()]
    return removed + differ + sorted(written.difference(kept))


def _earlier_synth(out: Path) -> dict[str, Any] | None:
    """The ``stats.json`` of the data set ``vstar synth`` wrote at ``out``; None where there is none."""
    if not (out.is_dir() and written_by(out, "synthetic")):
        return None
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    return stats if isinstance(stats, dict) else None


def _sid_settings(report: object) -> dict[str, Any]:
    """What a ``stats.json``'s SID report says the SIDs were built with."""
    return {k: report.get(k) for k in ("levels", "codebook_size", "seed")} if isinstance(report, dict) else {}


def _other_settings(out: Path, old: object, new: dict[str, Any]) -> str:
    """The refusal of a data set of other settings over an earlier one: what differs, and the way out."""
    if isinstance(old, dict):
        keys = sorted(set(old) | set(new))
        changed = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))
    else:
        changed = "settings it did not record"
    return (
        f"{out} holds a synthetic data set of other settings ({changed}), which checkpoints may have been trained "
        "on: pass --force to replace it, or choose another --out"
    )
