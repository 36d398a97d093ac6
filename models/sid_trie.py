"""Prefix trie over SIDs, held as dense tensors so decoders never loop over beams.

Nodes are numbered level by level (root = 0). ``child_nodes(nodes)[..., code]``
is the child node reached by code ``code`` of the node's level, or -1. Codes
are local to a level (``<b_7>`` is code 7 of level 1); ``level_token_ids[level,
code]`` gives the LM vocabulary id of that token, so a decoder gathers the
level's columns of the logits (``logits[:, level_token_ids[level]]``), adds the
node's row of the additive mask (``mask_rows``) and never builds a
full-vocabulary mask. Leaves (depth == catalog depth) map to a SID index of the
catalog via ``leaf_sid``.

A trie may hold some of the catalog's SIDs (``keep``: a service's items that
are no longer offered): the decoders then never reach the others, with no
change of theirs. Its levels' codes, codebook and token tables stay the
catalog's, so every shape is the whole catalog's; ``sid_node`` is -1 for a SID
left out and ``num_sids`` counts the SIDs held.

The child table has a row per prefix node only (depth < catalog depth), plus
one row of -1 that every leaf, and any id that is no node (-1: an unused
slot), reads. Leaves are most of the nodes (a catalog of N SIDs has N of
them), so a row of C codes each would make the table grow with the catalog:
with C = 256 and 100,000 random SIDs the trie's tensors took 448 MiB that
way, 155 MiB with rows for the prefixes alone, whose number stays under 1 + C +
... + C^(depth-1) however large the catalog grows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from models.sid_catalog import MAX_CODES, SidCatalog, token_code


class SidTrie:
    def __init__(
        self, catalog: SidCatalog, token_to_id: Callable[[str], int], keep: Sequence[int] | None = None
    ) -> None:
        """``keep``: the SID indices the trie holds (None: all of the catalog's)."""
        self.depth = catalog.depth
        sid_codes = [tuple(token_code(t) for t in sid) for sid in catalog.sids]  # parsed once, used per level
        kept = range(len(sid_codes)) if keep is None else sorted(set(keep))
        if not kept:
            raise ValueError("a trie needs at least one SID to hold")
        if kept[0] < 0 or kept[-1] >= len(sid_codes):
            raise ValueError(f"SID indices to keep run outside the catalog's 0..{len(sid_codes) - 1}")
        codes_per_level = [sorted({path[lv] for path in sid_codes}) for lv in range(self.depth)]
        self.codebook_size = max(max(c) for c in codes_per_level) + 1
        if self.codebook_size > MAX_CODES:  # every table, and each decode step's gather of logits, is this wide
            lv = max(range(self.depth), key=lambda level: codes_per_level[level][-1])
            used = len(codes_per_level[lv])
            fix = (
                "renumber each level's codes 0..n-1 in index.json"
                if used <= MAX_CODES
                else "use more SID levels of fewer codes each (vstar sids --levels)"
            )
            raise ValueError(
                f"SID codes run up to {self.codebook_size - 1:,} (level {lv}, where {used:,} codes are used): the "
                f"trie and the decoders size their tables by the largest code, at most {MAX_CODES:,}; {fix}"
            )
        level_ids = torch.full((self.depth, self.codebook_size), -1, dtype=torch.long)
        for lv, codes in enumerate(codes_per_level):
            for c in codes:
                tok = f"<{'abcdefgh'[lv]}_{c}>"
                tid = token_to_id(tok)
                if tid is None or tid < 0:
                    raise ValueError(f"SID token {tok} is not in the tokenizer's vocabulary")
                level_ids[lv, c] = tid
        self.level_token_ids = level_ids  # (depth, C)

        # Build nodes breadth-first so node ids are grouped by level.
        prefix_node: dict[tuple[int, ...], int] = {(): 0}
        node_depth = [0]
        edges: list[tuple[int, int, int]] = []
        for lv in range(self.depth):
            for index in kept:
                prefix = sid_codes[index][: lv + 1]
                if prefix not in prefix_node:
                    prefix_node[prefix] = len(node_depth)
                    node_depth.append(lv + 1)
                    edges.append((prefix_node[prefix[:-1]], prefix[-1], prefix_node[prefix]))
        num_nodes = len(node_depth)
        self.num_prefixes = sum(1 for d in node_depth if 1 <= d < self.depth)  # the nodes VED can feed
        # nodes are numbered by level, so the root and the prefixes are the first ids; the row after them is all -1
        children = torch.full((self.num_inner_nodes + 1, self.codebook_size), -1, dtype=torch.long)
        edge = torch.tensor(edges, dtype=torch.long).reshape(-1, 3)  # (parent, code, child) rows
        children[edge[:, 0], edge[:, 1]] = edge[:, 2]
        self._children = children  # (inner nodes + 1, C)
        # Additive mask: 0 for a valid child code, -inf otherwise; one row lookup per node.
        self._mask_bias = torch.where(children >= 0, 0.0, float("-inf"))  # (inner nodes + 1, C) float32
        self.level_columns = level_ids.clamp(min=0)  # (depth, C) gather-safe vocabulary ids
        self.node_depth = torch.tensor(node_depth, dtype=torch.long)  # (nodes,)
        kept_index = torch.tensor(list(kept), dtype=torch.long)
        kept_node = torch.tensor([prefix_node[sid_codes[i]] for i in kept], dtype=torch.long)
        leaf_sid = torch.full((num_nodes,), -1, dtype=torch.long)
        leaf_sid[kept_node] = kept_index
        sid_node = torch.full((len(sid_codes),), -1, dtype=torch.long)
        sid_node[kept_index] = kept_node
        self.leaf_sid = leaf_sid  # (nodes,)
        self.sid_node = sid_node  # (SIDs,) the leaf of each SID index, -1 for one the trie does not hold
        self.num_sids = len(kept)  # complete SIDs held: one leaf each
        # nodes per level (0: the root, depth: the leaves), as plain ints: read per decode without a reduction
        # over every node (at 1,000,000 SIDs three of those took 12 ms, and on a GPU each waits for the device)
        self.level_sizes: list[int] = torch.bincount(self.node_depth, minlength=self.depth + 1).tolist()
        parents = torch.zeros(num_nodes, dtype=torch.long)  # the root is its own parent
        parents[edge[:, 2]] = edge[:, 0]
        self.parent = parents  # (nodes,)
        self._leaf_counts: torch.Tensor | None = None  # (nodes,) on first use: ``leaf_counts``
        self._id_to_level_code = {
            int(level_ids[lv, c]): (lv, c)
            for lv in range(self.depth)
            for c in range(self.codebook_size)
            if level_ids[lv, c] >= 0
        }

    @property
    def num_nodes(self) -> int:
        return int(self.node_depth.shape[0])

    @property
    def num_inner_nodes(self) -> int:
        """Nodes with children: the root and the prefixes, the child table's rows before its row of -1."""
        return self.num_prefixes + 1

    @property
    def device(self) -> torch.device:
        return self._children.device

    @property
    def row_nbytes(self) -> int:
        """Bytes a node's row of the child table and of the mask take."""
        return self.codebook_size * (self._children.element_size() + self._mask_bias.element_size())

    @property
    def nbytes(self) -> int:
        """Bytes of the trie's tensors."""
        tensors = (self._children, self._mask_bias, self.level_token_ids, self.level_columns, self.node_depth)
        return sum(t.numel() * t.element_size() for t in (*tensors, self.leaf_sid, self.sid_node, self.parent))

    def _rows(self, nodes: torch.Tensor) -> torch.Tensor:
        """Each node's row of the child table: its own for a prefix, the row of -1 for a leaf or a non-node."""
        inside = (nodes >= 0) & (nodes < self.num_inner_nodes)
        return torch.where(inside, nodes, self.num_inner_nodes)

    def child_nodes(self, nodes: torch.Tensor) -> torch.Tensor:
        """(..., C): each node's child by code, -1 where there is none (every code of a leaf)."""
        return self._children[self._rows(nodes)]

    def child_node(self, nodes: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The child of each node by its code (same shapes), -1 where there is none."""
        return self._children[self._rows(nodes), codes]

    def mask_rows(self, nodes: torch.Tensor) -> torch.Tensor:
        """(N, C) additive mask of the nodes (N,): 0 for a code with a child, -inf otherwise."""
        return self._mask_bias.index_select(0, self._rows(nodes))

    def to(self, device: torch.device | str) -> SidTrie:
        self.level_token_ids = self.level_token_ids.to(device)
        self._children = self._children.to(device)
        self._mask_bias = self._mask_bias.to(device)
        self.level_columns = self.level_columns.to(device)
        self.node_depth = self.node_depth.to(device)
        self.leaf_sid = self.leaf_sid.to(device)
        self.sid_node = self.sid_node.to(device)
        self.parent = self.parent.to(device)
        self._leaf_counts = None
        return self

    def leaf_counts(self) -> torch.Tensor:
        """(nodes,): the complete SIDs under each node (1 at a leaf); computed on first use."""
        if self._leaf_counts is None:
            counts = (self.leaf_sid >= 0).long()
            for d in range(self.depth - 1, -1, -1):
                at = self.level_nodes(d)
                kids = self.child_nodes(at)  # (n_d, C)
                counts[at] = torch.where(kids >= 0, counts[kids.clamp(min=0)], 0).sum(-1)
            self._leaf_counts = counts
        return self._leaf_counts

    def level_nodes(self, level: int) -> torch.Tensor:
        """Ids of the nodes at ``level`` (0: the root, ``depth``: the leaves); ids are numbered by level."""
        return torch.nonzero(self.node_depth == level).flatten()

    @functools.cached_property
    def _prefix_node(self) -> dict[tuple[int, ...], int]:
        """Every node by its path of codes, for the reference decoder's queries by prefix (``node_of_token_ids``)
        alone: built from the child table on first use, so a process that never runs the reference (an API
        replica, a training run) never holds it. At a million SIDs the dict took 133 MiB beside the tensors'
        225 MiB (tracemalloc), where the decoders need none of it."""
        children = self._children[: self.num_inner_nodes].cpu()
        parents, codes = torch.nonzero(children >= 0, as_tuple=True)  # row-major: a parent's edges after its own
        paths: dict[int, tuple[int, ...]] = {0: ()}
        edges = zip(parents.tolist(), codes.tolist(), children[parents, codes].tolist(), strict=True)
        for parent, code, child in edges:
            paths[child] = (*paths[parent], code)  # a node's parent has a smaller id (numbered by level)
        return {path: node for node, path in paths.items()}

    def node_of_token_ids(self, token_ids: Sequence[int]) -> int:
        """Node reached by a prefix of vocabulary ids; -1 if it is not a valid prefix."""
        prefix = []
        for lv, tid in enumerate(token_ids):
            lc = self._id_to_level_code.get(int(tid))
            if lc is None or lc[0] != lv:
                return -1
            prefix.append(lc[1])
        return self._prefix_node.get(tuple(prefix), -1)

    def allowed_token_ids(self, prefix_token_ids: Sequence[int]) -> list[int]:
        """Vocabulary ids allowed after a prefix (the reference decoder's per-beam query)."""
        lv = len(prefix_token_ids)
        if lv >= self.depth:
            return []
        node = self.node_of_token_ids(prefix_token_ids)
        if node < 0:
            return []
        codes = torch.nonzero(self.child_nodes(torch.tensor(node, device=self.device)) >= 0).flatten()
        return self.level_token_ids[lv, codes].tolist()
