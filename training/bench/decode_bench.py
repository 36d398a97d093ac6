"""``vstar bench decode``: our constrained beam search against HF ``generate`` and the floor.

For each (K, batch) cell the same prompts are decoded by

* ``ours``: ``models.beam_search.beam_search``;
* ``reference``: HF ``generate`` with a trie ``prefix_allowed_tokens_fn`` and
  ``length_penalty=0`` (how the public MiniOneRec code decodes);
* ``forward``: the bare forward passes any such decode needs - one prefill of the
  B prompts, the cache expanded to B*K rows, then one cached step of B*K rows per
  further SID level - with no search logic. That is the floor.

The three are timed interleaved, the best of the repeats reported
(``training.bench.timing``). ``identical`` is true
when ours returns the same SIDs in the same order as the reference for every
prompt, with scores equal to float tolerance.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

from models.backbone import decode_step, prefill
from models.beam_search import BeamSearchConfig, beam_search
from models.hf_beam_search import hf_beam_search
from models.policy import Policy
from models.sid_catalog import Sid
from training.bench.timing import best_of_interleaved


@torch.inference_mode()
def forward_floor(policy: Policy, ids: torch.Tensor, mask: torch.Tensor, k: int) -> None:
    """The floor: beam search's own prefill and cached steps on B*K rows, without any search."""
    trie, b = policy.trie, ids.shape[0]
    pre = prefill(policy.model, ids, mask)
    pre.cache.batch_repeat_interleave(k)
    step_mask = mask.repeat_interleave(k, dim=0)
    pos = pre.next_position.repeat_interleave(k)
    for level in range(1, trie.depth):
        step_mask = torch.cat([step_mask, step_mask.new_ones((b * k, 1))], dim=1)
        tok = trie.level_token_ids[level - 1].clamp(min=0)[:1].expand(b * k)
        decode_step(policy.model, pre.cache, tok, step_mask, pos + level - 1)


def sample_histories(policy: Policy, n: int, length: int, seed: int) -> list[list[Sid]]:
    rng = random.Random(seed)
    sids = policy.catalog.sids
    return [[rng.choice(sids) for _ in range(length)] for _ in range(n)]


def same_results(a: Any, b: Any) -> bool:
    if not torch.equal(a.sid_index, b.sid_index):
        return False
    finite = torch.isfinite(b.scores)
    return bool(torch.allclose(a.scores[finite], b.scores[finite], rtol=1e-4, atol=1e-4))


def time_cell(policy: Policy, histories: list[list[Sid]], k: int, repeats: int) -> dict[str, Any]:
    ids, mask = policy.encode_prompts(histories)
    config = BeamSearchConfig(k)
    runs: dict[str, Callable[[], Any]] = {
        "ours": lambda: beam_search(policy.model, policy.trie, ids, mask, config),
        "reference": lambda: hf_beam_search(policy.model, policy.trie, ids, mask, config),
        "forward": lambda: forward_floor(policy, ids, mask, k),
    }
    identical = same_results(runs["ours"](), runs["reference"]())  # also the warm-up
    runs["forward"]()
    ms = best_of_interleaved(runs, repeats, policy.device)
    return {
        "k": k,
        "batch": len(histories),
        "ours_ms": round(ms["ours"], 3),
        "reference_ms": round(ms["reference"], 3),
        "forward_ms": round(ms["forward"], 3),
        "speedup": round(ms["reference"] / ms["ours"], 2),
        "floor_ratio": round(ms["ours"] / ms["forward"], 3),
        "identical": identical,
    }


def run_decode_bench(
    policy: Policy,
    ks: tuple[int, ...] = (10, 50),
    batches: tuple[int, ...] = (1, 32),
    history_len: int = 10,
    repeats: int = 10,
    seed: int = 0,
    histories: list[list[Sid]] | None = None,
) -> dict[str, Any]:
    policy.model.eval()
    rows = []
    for k in ks:
        for b in batches:
            hs = histories[:b] if histories is not None else sample_histories(policy, b, history_len, seed + b)
            rows.append(time_cell(policy, hs, k, repeats))
    return {"rows": rows, "device": str(policy.device), "threads": torch.get_num_threads(), "repeats": repeats}


def format_table(result: dict[str, Any]) -> str:
    lines = [
        "| K | batch | ours ms | reference ms | forward (floor) ms | speed-up | ours / floor | identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['k']} | {r['batch']} | {r['ours_ms']:.2f} | {r['reference_ms']:.2f} | {r['forward_ms']:.2f} | "
            f"{r['speedup']:.2f}x | {r['floor_ratio']:.2f} | {r['identical']} |"
        )
    return "\n".join(lines)
