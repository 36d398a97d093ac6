"""The slot buffers of VED's tree nodes: the gather's layout, a step on the slot cache against one on a
``DynamicCache`` of the same past (bit for bit), and the fallback for layers other than full attention."""

from __future__ import annotations

import copy
import random

import torch
from transformers import DynamicCache

from models.backbone import decode_step, layer_kv, prefill
from models.node_cache import NodeSlots, gather, slot_cache
from models.policy import Policy


def prompts(policy: Policy, lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = random.Random(seed)
    return policy.encode_prompts([[rng.choice(policy.catalog.sids) for _ in range(n)] for n in lengths])


def test_gather_reads_each_nodes_slots_in_attention_layout() -> None:
    buffer = torch.randn(3, 2, 7, 4)  # (B, heads, T+M, d)
    rows = torch.tensor([2, 0, 2])
    slots = torch.tensor([[0, 1, 5], [3, 3, 6], [1, 0, 2]])
    got = gather(buffer, rows, slots)
    assert got.shape == (3, 2, 3, 4) and got.is_contiguous()
    for n in range(3):
        for h in range(2):
            for j in range(3):
                assert torch.equal(got[n, h, j], buffer[rows[n], h, slots[n, j]])


def test_node_slots_hold_the_prompt_then_what_is_stored_at_each_node() -> None:
    k, v = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)  # (B, heads, T, d)
    slots = NodeSlots([(k, v)], nodes=6)
    [(bk, bv)] = slots.layers
    assert bk.shape == (2, 3, 10, 5) and torch.equal(bk[:, :, :4], k) and torch.equal(bv[:, :, :4], v)
    assert not bk[:, :, 4:].any()
    rows, at = torch.tensor([1, 0]), torch.tensor([4 + 2, 4 + 5])
    new_k, new_v = torch.randn(2, 3, 5), torch.randn(2, 3, 5)  # (N, heads, d)
    slots.store(rows, at, [(new_k, new_v)])
    [(gk, gv)] = slots.gather(rows, torch.stack([torch.tensor([0, 3, 6]), torch.tensor([1, 2, 9])]))
    assert torch.equal(gk[0, :, :2], k[1, :, [0, 3]]) and torch.equal(gk[0, :, 2], new_k[0])
    assert torch.equal(gv[1, :, :2], v[0, :, [1, 2]]) and torch.equal(gv[1, :, 2], new_v[1])


def test_a_step_on_the_slot_cache_equals_one_on_a_dynamic_cache(tiny_policy: Policy) -> None:
    """The slot cache fills the step's own last position in place; logits, states and keys equal a
    ``DynamicCache`` built from the same past bit for bit (so VED's results do not change with it)."""
    model = tiny_policy.model
    ids, mask = prompts(tiny_policy, [2, 3], 4)
    pre = prefill(model, ids, mask, want_hidden=True)
    t = ids.shape[1]
    rows = torch.tensor([0, 1, 1])
    slots = torch.tensor([[*range(t), 0], [*range(t), 1], [*range(t), 2]])  # the prompt, then a last slot
    past = [(gather(k, rows, slots), gather(v, rows, slots)) for k, v in map(layer_kv, pre.cache.layers)]
    step_mask = torch.cat([mask[rows], torch.ones(3, 1, dtype=mask.dtype)], dim=1)
    position = mask[rows].sum(-1)
    token = tiny_policy.trie.level_token_ids[0, :3]
    runs = []
    for cache in (
        DynamicCache([(k[:, :, :-1], v[:, :, :-1]) for k, v in past], config=model.config),
        slot_cache(model, past),
    ):
        logits, hidden = decode_step(model, cache, token, step_mask, position, want_hidden=True)
        runs.append((logits, hidden, [layer_kv(layer) for layer in cache.layers]))
    (logits_a, hidden_a, kv_a), (logits_b, hidden_b, kv_b) = runs
    assert torch.equal(logits_a, logits_b) and hidden_a is not None and hidden_b is not None
    assert torch.equal(hidden_a, hidden_b)
    for (ka, va), (kb, vb) in zip(kv_a, kv_b, strict=True):
        assert ka.shape == kb.shape == (3, ka.shape[1], t + 1, ka.shape[3])
        assert torch.equal(ka, kb) and torch.equal(va, vb)


def test_a_backbone_with_sliding_window_layers_gets_a_dynamic_cache(tiny_policy: Policy) -> None:
    model = copy.deepcopy(tiny_policy.model)
    config = model.config
    config.use_sliding_window, config.sliding_window, config.max_window_layers = True, 16, 0
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    past = [(torch.zeros(2, 1, 5, 8), torch.zeros(2, 1, 5, 8))] * config.num_hidden_layers
    cache = slot_cache(model, past)
    assert [type(layer).__name__ for layer in cache.layers] == ["DynamicSlidingWindowLayer"] * len(past)
    assert all(layer.get_seq_length() == 4 for layer in cache.layers)  # the past, without the step's slot
