"""``vstar bench catalog``: what the catalog's size costs the decoders.

For each catalog size a random catalog of that many distinct SIDs (``--codebook``
codes per level, three levels, one item each) and a tiny random policy over it
are built, and measured:

* ``trie_mib``: the trie's tensors as ``models.sid_trie`` holds them (a child
  table row per prefix node), against ``row_per_node_mib``, the same tensors
  with a row for every node, leaves included (their size, computed), the
  layout that grew with the catalog;
* ``python_mib``: the Python objects the trie holds beside its tensors
  (``tracemalloc`` over one more build, untimed, after a garbage collect; the
  tensors' storage is torch's, which it does not see): the per-node dict of
  prefixes it once held beside them took 133 MiB at a million SIDs;
* ``build_s``: building the trie (the service and every trainer do it at start);
* per batch of histories (10 random items each), the fusion bonus
  (``TransitionCounts.node_bonus``: the paths above the followed SIDs, held
  sparse) against ``trie_wide_bonus``, the dense table built by a pass over
  the whole trie per row, which it replaced (``identical``: the two tables are
  equal), and a fused beam search of width 10 with that bonus (``beam_ms``:
  the decode a served request pays for after it).

The counts hold 20 followers (1-4 each) for every item the histories name: the
bonus reads no others. Timings are the best of interleaved repeats
(``training.bench.timing``).
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from models.beam_search import BeamSearchConfig, beam_search
from models.policy import Policy
from models.sid_catalog import Item, SidCatalog, level_token
from models.sid_trie import SidTrie
from models.transition import TransitionCounts
from training.bench.timing import best_of_interleaved

DEPTH = 3
FOLLOWERS = 20
HISTORY = 10


def random_catalog(num_sids: int, codebook: int, seed: int) -> SidCatalog:
    """``num_sids`` distinct random SIDs of three levels, item i on the i-th."""
    if num_sids > codebook**DEPTH:
        raise ValueError(f"{num_sids} distinct SIDs need more than {codebook} codes per level ({codebook**DEPTH} SIDs)")
    flat = np.random.default_rng(seed).choice(codebook**DEPTH, size=num_sids, replace=False)
    codes = np.stack([flat // codebook**2, flat // codebook % codebook, flat % codebook], axis=1).tolist()
    return SidCatalog(
        {i: Item(i, "", tuple(level_token(lv, c) for lv, c in enumerate(sid))) for i, sid in enumerate(codes)}
    )


def trie_wide_bonus(
    counts: TransitionCounts, histories: list[list[int]], catalog: SidCatalog, trie: SidTrie, weight: float
) -> torch.Tensor:
    """The reference: the (B, nodes) bonus built over every SID and every node for each row, leaves up."""
    leaf = torch.zeros((len(histories), len(catalog.sids)))
    for row, history in enumerate(histories):
        sids = counts.sid_scores(history, catalog)
        if sids:
            leaf[row, list(sids)] = torch.tensor(list(sids.values()))
    bonus = torch.zeros((len(histories), trie.num_nodes), device=trie.device)
    bonus[:, trie.sid_node] = torch.log1p(leaf.to(trie.device)) * weight
    for level in range(trie.depth, 0, -1):
        nodes = trie.level_nodes(level)
        bonus.scatter_reduce_(1, trie.parent[nodes].expand(len(histories), -1), bonus[:, nodes], reduce="amax")
    return bonus


def trie_bytes(trie: SidTrie) -> tuple[int, int]:
    """The trie's tensor bytes as held, and with a child-table and mask row for every node, leaves included, in
    place of the rows of the prefix nodes and the row of -1."""
    return trie.nbytes, trie.nbytes + (trie.num_nodes - trie.num_inner_nodes - 1) * trie.row_nbytes


def catalog_cell(
    policy: Policy, trie: SidTrie, histories: list[list[int]], counts: TransitionCounts, repeats: int
) -> dict[str, Any]:
    """One batch of histories: the bonus against the trie-wide pass, and the fused beam search."""
    catalog = policy.catalog
    ids, mask = policy.encode_prompts([[catalog.sid_of(i) for i in h] for h in histories])
    bonus = counts.node_bonus(histories, catalog, trie, 3.0)
    identical = bool(torch.equal(bonus.dense(), trie_wide_bonus(counts, histories, catalog, trie, 3.0)))
    runs = {
        "ours": lambda: counts.node_bonus(histories, catalog, trie, 3.0),
        "reference": lambda: trie_wide_bonus(counts, histories, catalog, trie, 3.0),
        "beam": lambda: beam_search(policy.model, trie, ids, mask, BeamSearchConfig(10), bonus),
    }
    with torch.inference_mode():
        runs["beam"]()  # warm-up
        ms = best_of_interleaved(runs, repeats, policy.device)
    return {
        "batch": len(histories),
        "bonus_ms": round(ms["ours"], 3),
        "trie_wide_ms": round(ms["reference"], 3),
        "speedup": round(ms["reference"] / ms["ours"], 2),
        "identical": identical,
        "beam_ms": round(ms["beam"], 3),
    }


def python_bytes(build: Callable[[], object]) -> int:
    """Bytes of the Python objects that what ``build`` returns still holds once built, by ``tracemalloc`` (torch's
    tensor storage is not traced: ``trie_bytes`` counts it)."""
    gc.collect()
    tracemalloc.start()
    try:
        built = build()
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del built
    return held


def catalog_row(
    num_sids: int, batches: tuple[int, ...], codebook: int, repeats: int, seed: int, device: str
) -> dict[str, Any]:
    catalog = random_catalog(num_sids, codebook, seed)
    policy = Policy.from_preset("tiny", catalog, seed=seed).to(device)
    policy.model.eval()
    t0 = time.perf_counter()
    trie = SidTrie(catalog, policy.token_id).to(device)  # timed here; the policy built its own
    build_s = time.perf_counter() - t0
    held, per_node = trie_bytes(trie)
    python = python_bytes(lambda: SidTrie(catalog, policy.token_id))
    rng = np.random.default_rng(seed)
    cells = []
    for b in batches:
        histories = rng.integers(0, num_sids, size=(b, HISTORY)).tolist()
        followers = {
            item: Counter(
                dict(
                    zip(
                        rng.integers(0, num_sids, FOLLOWERS).tolist(),
                        rng.integers(1, 5, FOLLOWERS).tolist(),
                        strict=True,
                    )
                )
            )
            for item in sorted({i for h in histories for i in h})
        }
        cells.append(catalog_cell(policy, trie, histories, TransitionCounts(followers, window=3), repeats))
    return {
        "sids": num_sids,
        "nodes": trie.num_nodes,
        "build_s": round(build_s, 2),
        "trie_bytes": held,
        "row_per_node_bytes": per_node,
        "trie_mib": round(held / 2**20, 1),
        "python_bytes": python,
        "python_mib": round(python / 2**20, 1),
        "row_per_node_mib": round(per_node / 2**20, 1),
        "memory_ratio": round(per_node / held, 2),
        "cells": cells,
    }


def run_catalog_bench(
    sizes: tuple[int, ...],
    batches: tuple[int, ...] = (1, 32),
    codebook: int = 256,
    repeats: int = 5,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    rows = [catalog_row(n, batches, codebook, repeats, seed, device) for n in sizes]
    return {
        "rows": rows,
        "codebook": codebook,
        "device": device,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [
        "| SIDs | nodes | trie build s | trie MiB | row per node MiB | ratio | trie Python MiB | batch | bonus ms "
        "| trie-wide ms | speed-up | identical | fused beam (10) ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        for c in r["cells"]:
            lines.append(
                f"| {r['sids']} | {r['nodes']} | {r['build_s']:.2f} | {r['trie_mib']:.1f} | "
                f"{r['row_per_node_mib']:.1f} | {r['memory_ratio']:.2f}x | {r['python_mib']:.1f} | {c['batch']} | "
                f"{c['bonus_ms']:.2f} | "
                f"{c['trie_wide_ms']:.2f} | {c['speedup']:.2f}x | {c['identical']} | {c['beam_ms']:.2f} |"
            )
    return "\n".join(lines)
