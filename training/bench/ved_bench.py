"""``vstar bench ved``: VED against beam search at the same token budget.

For each (G, batch) cell the same prompts are decoded by

* ``ved``: ``models.ved.ved_search`` returning G SIDs, with the checkpoint's
  value head and VED settings as ``vstar eval --decoder ved`` reads them (no
  exploratory slots; ``--budget``, else the checkpoint's, else VED's own for G,
  ``models.ved_config.resolve_budget``: twice what beam search of width G
  feeds, at least what the initial tree may need);
* ``beam``: constrained beam search of the widest beam whose tokens fit that
  budget, as ``vstar diagnose --budget`` compares the two: the same tokens fed
  to the backbone per prompt, counted as ``training.rl.rollout.beam_tokens``
  counts them (a level with fewer prefixes than the width costs its prefixes,
  so on a catalog with few first-level codes the width is above
  budget // (D - 1) for SIDs of D tokens; ``equal_budget_beam_width``). A
  budget that pays for more beams than the catalog has SIDs runs (and reports)
  one beam per SID: beam search holds no more (``models.beam_search``), and
  VED then covers the catalog too and stops short of its budget.

``ratio`` is VED's time over beam search's: what the same tokens cost when fed
VED's way (more, smaller forwards, and the search between them).
``ved_tokens`` is the mean of what VED fed per prompt (it may stop short of its
budget when the tree is exhausted), and ``ved_iterations`` the mean of its
selections. Timings are the best of
interleaved repeats (``training.bench.timing``).

Without ``--checkpoint`` the policy is a random tiny model over a random
catalog (``vstar bench decode``'s) and the value head a fresh one: the figures
then time the search's machinery, not a trained model's trees.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from models.beam_search import BeamSearchConfig, beam_search
from models.policy import Policy
from models.sid_catalog import Sid
from models.value_head import ValueHead
from models.ved import ved_search
from models.ved_config import VEDConfig, resolve_budget
from training.bench.decode_bench import sample_histories
from training.bench.timing import best_of_interleaved
from training.rl.rollout import beam_tokens, equal_budget_beam_width


def time_cell(
    policy: Policy, head: ValueHead, config: VEDConfig, histories: list[list[Sid]], repeats: int
) -> dict[str, Any]:
    ids, mask = policy.encode_prompts(histories)
    depth = policy.trie.depth
    budget = resolve_budget(config, depth)
    width = equal_budget_beam_width(budget, policy.trie)  # the width beam search runs
    beam_config = BeamSearchConfig(width)
    runs: dict[str, Callable[[], Any]] = {
        "ved": lambda: ved_search(policy.model, head, policy.trie, ids, mask, config),
        "beam": lambda: beam_search(policy.model, policy.trie, ids, mask, beam_config),
    }
    stats = runs["ved"]().stats  # also the warm-up
    runs["beam"]()
    ms = best_of_interleaved(runs, repeats, policy.device)
    return {
        "g": config.num_candidates,
        "batch": len(histories),
        "budget": budget,
        "beam_width": width,
        "beam_tokens": beam_tokens(width, policy.trie),  # per prompt: at most the budget
        "ved_ms": round(ms["ved"], 3),
        "beam_ms": round(ms["beam"], 3),
        "ratio": round(ms["ved"] / ms["beam"], 2),
        "ved_tokens": round(sum(s.tokens_spent for s in stats) / len(stats), 2),
        "ved_iterations": round(sum(s.iterations for s in stats) / len(stats), 2),
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [
        "| G | batch | budget | beam width | VED ms | beam ms | VED / beam | VED tokens | VED selections |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['g']} | {r['batch']} | {r['budget']} | {r['beam_width']} | {r['ved_ms']:.2f} | {r['beam_ms']:.2f} "
            f"| {r['ratio']:.2f}x | {r['ved_tokens']:.1f} | {r['ved_iterations']:.1f} |"
        )
    return "\n".join(lines)


def run_ved_bench(
    policy: Policy,
    head: ValueHead,
    base: VEDConfig,
    gs: tuple[int, ...] = (10, 16),
    batches: tuple[int, ...] = (1, 32),
    history_len: int = 10,
    repeats: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Every (G, batch) cell; ``base``: the VED settings but G (its budget None: VED's own for each G)."""
    policy.model.eval()
    head.eval()
    rows = []
    for g in gs:
        config = replace(base, num_candidates=g)
        for b in batches:
            rows.append(time_cell(policy, head, config, sample_histories(policy, b, history_len, seed + b), repeats))
    return {"rows": rows, "device": str(policy.device), "threads": torch.get_num_threads(), "repeats": repeats}
