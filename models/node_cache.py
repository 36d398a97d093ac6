"""Keys and values of a search's tree nodes, for VED (``models.ved``): each node is fed to the backbone once.

The prompts are prefilled once. Per layer, one buffer holds the keys (and one
the values) of every prompt position followed by one slot per tree node,
filled when the node is evaluated (``NodeSlots``). A batch of nodes runs on a
cache gathered from the buffers by one index each (prompt + ancestors; the
unused slots of shorter paths are masked out by the caller), straight into the
layout attention reads and one position longer, for the node's own key and
value, which the step writes in place (``slot_cache``). That is one copy of the
past per layer and step, where a ``DynamicCache`` built from the gathered past
made three (it copies the past to hold it, then again to append to it): the
same answers bit for bit; at batch 32 on the small preset 9-17% less time by
``vstar bench ved`` and 12-20% in a plain loop (README, "VED against beam
search at the same token budget"). The value head keeps its own keys and
values in ``NodeSlots`` too, so a node's value is one query.

Tree attention over a prompt's shared cache (as beam search reads it) would
copy less still, but it sums the attention in another order, and so would
change the last bits of every VED answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

KV = tuple[torch.Tensor, torch.Tensor]


class NodeSlots:
    """Per layer, (keys, values) buffers of shape (B, heads, T+M, d): the prompt's T positions, then one slot
    per tree node (node n at T + n)."""

    def __init__(self, prompt: Sequence[KV], nodes: int) -> None:  # each (B, heads, T, d)
        def slots(x: torch.Tensor) -> torch.Tensor:
            b, heads, t, d = x.shape
            buffer = x.new_zeros(b, heads, t + nodes, d)
            buffer[:, :, :t] = x
            return buffer

        self.layers = [(slots(k), slots(v)) for k, v in prompt]

    def gather(self, rows: torch.Tensor, slots: torch.Tensor) -> list[KV]:
        """Each layer's slots ``slots`` (N, S) of rows ``rows`` (N,), as contiguous (N, heads, S, d)."""
        return [(gather(k, rows, slots), gather(v, rows, slots)) for k, v in self.layers]

    def store(self, rows: torch.Tensor, slot: torch.Tensor, kv: Sequence[KV]) -> None:
        """Write each layer's (keys, values), (N, heads, d) each, into slot ``slot`` (N,) of rows ``rows`` (N,)."""
        for (k, v), (new_k, new_v) in zip(self.layers, kv, strict=True):
            k[rows, :, slot], v[rows, :, slot] = new_k, new_v


def gather(buffer: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Slots ``slots`` (N, S) of rows ``rows`` (N,) of a (B, heads, T+M, d) slot buffer, as a contiguous
    (N, heads, S, d): one index over the buffer's flattened positions, so the one copy lands in the layout
    attention reads (a (B, T+M, heads, d) buffer needed a transposing copy after it)."""
    b, heads, p, d = buffer.shape
    base = (rows[:, None] * heads + torch.arange(heads, device=rows.device)) * p  # (N, heads)
    return buffer.view(b * heads * p, d)[base[:, :, None] + slots[:, None, :]]


class _SlotLayer(DynamicLayer):
    """One layer's cache for a batch of nodes: the gathered past with the node's own position last, which the
    step's ``update`` fills in place. A ``DynamicLayer`` given the past copies it once to hold it and once more
    to append the new key and value to it."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:  # (N, kv heads, S + 1, head dim)
        super().__init__()
        self.lazy_initialization(keys, values)
        self.full = keys, values
        self.keys, self.values = keys[:, :, :-1], values[:, :, :-1]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.full
        keys[:, :, -1:], values[:, :, -1:] = key_states, value_states
        self.keys, self.values = keys, values
        return keys, values


def slot_cache(model: PreTrainedModel, layers: Sequence[KV]) -> DynamicCache:
    """A cache for one step of a batch of nodes, from each layer's gathered (keys, values), whose last position
    is the step's own (``_SlotLayer``). A backbone with layers of another kind than plain full attention (a
    sliding window, say) gets a ``DynamicCache`` of the past instead, which handles them."""
    cache = DynamicCache(config=model.config)
    if len(cache.layers) != len(layers) or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return DynamicCache([(k[:, :, :-1], v[:, :, :-1]) for k, v in layers], config=model.config)
    cache.layers = [_SlotLayer(k, v) for k, v in layers]
    return cache
