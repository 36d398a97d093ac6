"""VED: value-guided efficient decoding over valid SIDs (V-STAR's part C), reworked after measurement.

Per prompt, a tree of SID prefixes (``models.search_tree``) is grown within a
budget of backbone tokens; the complete SIDs under its deepest prefixes are
the pool from which ``num_candidates`` are returned (``models.candidate_set``).

1. init: constrained beam search of width ``init_beams`` over the prefix
   levels 1 .. D-1; every kept prefix becomes a tree node and is run through
   the backbone once, to read V(s) and the policy over its children. When the
   kept prefixes could not hold ``min(num_candidates, #SIDs)`` complete SIDs,
   a level keeps the next prefixes by score until they can (the trie's leaf
   counts say so), so the initial tree alone always answers, and a deadline
   that has passed returns it: then the returned set is exactly beam search's
   (width ``init_beams``) top G, in its order.
2. selection, 3. gated expansion, 4. backpropagation: see ``SearchTree`` for U
   (on G standardised within the tree), the "expand me" arm that lets any
   node widen (the root included), the gate and the descent. The new child is
   drawn from the selected node's unexpanded valid codes by the policy's
   probabilities at ``child_temperature``, renormalised over them (Gumbel-max).

Deviations from the first VED, the paper's as specified (instrumented on 300
held-out valid rows, its sets were narrower than beam search's at equal budget):

* accounting: beam search's. A complete SID is never fed to the backbone, so
  it costs nothing and is never a node: the moment a prefix of depth D-1 is
  evaluated, all its complete SIDs are known with their path log-probs (as
  beam search scores its last level). The first VED fed every complete SID,
  which cost the initial tree 32 of the default 64 tokens and 19 more tokens
  on complete SIDs under prefixes it already had.
* ranking: the returned set is ranked by path log-prob plus ``value_weight``
  x V of the SID's parent prefix standardised over the tree's prefixes of that
  depth (a complete SID has no value of its own now); then ``explore_slots``
  slots go to first-level codes not yet in the set. The first VED ranked by
  V(s_D), which cannot rank targets (mean target rank 18.8 of 32 by V, 9.6 by
  log-prob): re-ranking the very same trees by log-prob raised reachability
  from 0.050 to 0.113.
* widening: each node's own arm counts its own selections (``SearchTree``);
  the first VED's arm used N(s) and never won (0 root expansions per prompt).
* beta: in units of G's spread within the tree (G standardised per depth);
  raw G's std (0.09-0.12) was dwarfed by the bonus (0.2-1.0).

Defaults, chosen on the 2,000 most recent valid rows (held out of the SFT
model's training; small preset, seed 0; value head warmed up 200 steps). G =
16 at 64 tokens, beam search of width 32 keeping its 16 best: reachability
0.159, 7.22 distinct first-level codes. VED, reachability / distinct codes:

* ``init_beams`` 16 (the first VED: 8): 8 -> 0.1545 / 4.64, 12 -> 0.159 / 5.59,
  16 -> 0.1575 / 6.23, 32 (no search left) -> 0.159 / 7.22, beam search's own
  set. At inference (G = 10, 60 tokens; beam search of width 30: HR@10 0.132,
  coverage@10 0.249, tail share 0.127) init 10 gives 0.1335 / 0.256 / 0.152,
  16 gives 0.131 / 0.253 / 0.136 and 24 gives 0.132 / 0.249 / 0.128: a wider
  initial beam keeps reachability, a narrower one lets the search reach
  further from beam search's list; 16 is the narrowest that keeps both.
* ``explore_slots`` 0 here, 2 in RL rollouts (``training.rl.trainer``): with init 16,
  1 -> 0.1535 / 6.99, 2 -> 0.153 / 7.66, 4 -> 0.146 / 8.66; 2 is the least
  that spreads a group over more first-level codes than beam search's. In a
  recommendation list they cost accuracy (1 of 10: HR@10 0.127).
* ``value_weight`` 0 (0.25 -> 0.151 with 2 slots, against 0.153): the value
  head ranks the target 6.8-7.5th of beam search's 16 where log-prob ranks it
  5.1th. ``child_temperature`` 1 (0 -> 0.151) and ``beta`` 1 (0.5 -> 0.1525,
  2 -> 0.151) are within noise of each other (one row is 0.0005).
* Tried and dropped: growing the initial tree best-first by path log-prob
  until the top G were certain took the whole budget (63.6 of 64 tokens) and
  reached less than beam search (0.140 vs 0.144 on 500 rows of an earlier
  model); adding the standardised path log-prob to G did not help the search
  find beam search's SIDs (0.122-0.126 vs 0.122 at init 8, same rows).

Choices the paper leaves open:

* budget: tokens fed to the backbone per prompt, prefill excluded; every tree
  node below the root costs exactly one, the initial tree's included. Default
  (``models.ved_config.resolve_budget``): ``BUDGET_MULTIPLE`` (2) x what beam
  search of width ``num_candidates`` feeds ((depth - 1) x width), raised to the
  least budget that always fits the initial tree, (depth - 1) x
  max(init_beams, num_candidates); an explicit budget below that is a
  ``ValueError``.
* a gate-failed selection still counts as an iteration and backs up one visit
  along its path and one of the node's own arm (so the next descent leans
  elsewhere); it spends no token. After ``gate_patience`` consecutive failures
  the gate is waived for one expansion: the gate orders the search but never
  stalls it, so the search always spends its budget or exhausts the tree
  (every valid prefix present).
* a budget that covers every prefix of the catalog (small catalogs: the demo's
  600 SIDs have 289, and k = 100's default budget is 400) completes the tree
  after the initial one, a level at a time (forwards no wider than the initial
  tree's), with no selections: the search would end with the same nodes (the
  visit counts differ), as it only stops on the budget or an exhausted tree,
  but near the end its selections mostly fail the gate (measured on the demo's
  V-STAR checkpoint, k = 100, one prompt, an idle 2-core VM: 1,284 iterations,
  1,030 of them gate failures, 0.85 s; completed: 0.019 s, the same SIDs in the
  same order on 12 prompts x 4 settings, scores equal to 1e-4).
* budget that cannot be spent is reported, not hidden: ``VEDStats`` gives the
  budget, ``tokens_spent`` and ``stop_reason`` ("budget", "exhausted" or
  "deadline").
* deadline (anytime): checked before each step, and within a step's selections
  once one child is made; a step is at most one batched
  forward, so the overshoot is one step. The initial tree is always built.
* ``between_steps``: a callback run between forwards: after the prefill, between
  the initial tree's levels, and before each step or each forward that completes
  the catalog's prefixes (the server decodes waiting
  beam requests there, on the same model, rather than after the whole search);
  the deadline is checked after it. The search's result does not depend on it:
  the tree, its caches and its noise are the search's own.
* batching: each step makes up to ``expansions_per_step`` children per prompt
  (selections that fail the gate do not count; visits are backed up at once,
  so they spread) and evaluates all new nodes of
  all prompts in one forward. 1 is the paper's strictly sequential loop.
* KV reuse: the prompts are prefilled once (``models.backbone.prefill``, which
  also returns every prompt position's final state for the value head); the
  backbone's and the value head's keys and values of every prompt position and
  tree node are kept in slot buffers, from which a batch of nodes runs on its
  prompt + ancestors in one copy per layer (``models.node_cache``). What the
  search reads at every selection and changes only when a node is evaluated
  (Ĝ, the depth means, the open masks) is kept until then (``SearchTree``).
  ``vstar bench ved`` times a search against beam search of the same tokens.
* shallow fusion (``bonus``, optional; ``models.transition``): added where
  beam search adds it, to the initial tree's prefix scores and to the
  returned set's ranking score; the search's values and draws ignore it. RL's
  ``--fused-rollouts`` decodes V-STAR's groups with it, as the served model ranks.
* randomness: counter-based (a hash of the seed, the prompt's tokens, the new
  node's id and the code), so a prompt's result does not depend on its batch
  neighbours, and equal seeds give equal results on one CPU. On CUDA the
  per-depth sums (``models.search_tree.sum_by_depth``) are reductions rather
  than a scatter-add's atomic float adds, whose order varies from run to run
  and could break a near tie either way; run-to-run equality there is by that
  reading of the kernels, not measured here (no GPU). Vary ``seed`` per RL step.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.nn import functional as F
from transformers import PreTrainedModel

from models.backbone import decode_step, layer_kv, prefill
from models.beam_search import level_log_probs
from models.candidate_set import VEDResult, returned_set
from models.node_bonus import NodeBonus
from models.node_cache import NodeSlots, slot_cache
from models.search_noise import gumbel_noise, prompt_keys
from models.search_tree import SearchTree, rank_within
from models.sid_trie import SidTrie
from models.value_head import ValueHead
from models.ved_config import VEDConfig, VEDStats, covers_the_catalog, resolve_budget


class _Search:
    """One VED call: the prompts' caches, the per-node caches and the trees."""

    def __init__(
        self,
        model: PreTrainedModel,
        head: ValueHead,
        trie: SidTrie,
        config: VEDConfig,
        budget: int,
        batch: int,
        bonus: NodeBonus | None = None,  # (B, trie nodes): shallow fusion, as beam search's
        between_steps: Callable[[], None] | None = None,
    ) -> None:
        self.model, self.head, self.trie, self.config, self.budget = model, head, trie, config, budget
        self.bonus, self.between_steps = bonus, between_steps
        self.device = trie.device
        capacity = min(budget, trie.num_prefixes) + 1  # the root and at most every prefix of the catalog
        self.tree = SearchTree.empty(batch, capacity, trie.codebook_size, trie.depth - 1, config.lam, self.device)
        self.dtype = next(head.parameters()).dtype
        self.iterations = torch.zeros(batch, dtype=torch.long, device=self.device)  # selections per prompt
        self.failures, self.stall = self.iterations.clone(), self.iterations.clone()  # gate failures: all, in a row

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Run the prompts once; keep their caches (backbone and value head) and evaluate the roots."""
        self.keys = prompt_keys(input_ids, attention_mask, self.config.seed)  # (B,)
        pre = prefill(self.model, input_ids, attention_mask, want_hidden=True)
        assert pre.hidden is not None
        hidden = pre.hidden.to(self.dtype)  # (B, T, H)
        self.mask = attention_mask.long()  # (B, T)
        self.next_position = self.mask.sum(-1)  # (B,)
        b, m = input_ids.shape[0], self.tree.parent.shape[1]
        self.backbone_kv = NodeSlots([layer_kv(layer) for layer in pre.cache.layers], m)
        head_k, head_v = self.head.kv(hidden)  # (B, heads, T, d)
        self.head_kv = NodeSlots([(head_k, head_v)], m)
        root_value = self.head.step(hidden[:, -1], head_k, head_v, self.mask)  # (B,)
        roots = torch.zeros(b, dtype=torch.long, device=self.device)
        log_probs = F.log_softmax(pre.logits.float(), dim=-1)  # (B, V)
        root_lp = level_log_probs(log_probs, self.trie, 0, roots)  # (B, C)
        self.tree.evaluate(torch.arange(b, device=self.device), roots, root_value, root_lp)

    def evaluate(self, rows: torch.Tensor, nodes: torch.Tensor) -> None:
        """Feed the nodes' tokens to the backbone in one batch, on their prompt + ancestor caches."""
        tree, n, t = self.tree, rows.shape[0], self.mask.shape[1]
        depth = tree.depth[rows, nodes]  # (N,) >= 1
        width = int(depth.max()) - 1
        ancestors = tree.path[rows, nodes, :width].clamp(min=0)  # (N, A)
        seen = torch.arange(width, device=self.device)[None, :] < (depth - 1)[:, None]  # (N, A)
        mask = torch.cat([self.mask[rows], seen.long(), self.mask.new_ones(n, 1)], dim=1)  # (N, T+A+1)
        prompt = torch.arange(t, device=self.device).expand(n, -1)  # (N, T)
        own = t + nodes  # (N,) each node's own slot
        # (N, T+A+1): the gaps of shorter paths are masked; the node's own slot last, which the backbone's
        # step fills in the gathered cache (it holds nothing yet) and the value head reads once it is stored
        slots = torch.cat([prompt, t + ancestors, own[:, None]], dim=1)
        cache = slot_cache(self.model, self.backbone_kv.gather(rows, slots))
        position = self.next_position[rows] + depth - 1  # (N,)
        logits, hidden = decode_step(self.model, cache, tree.token[rows, nodes], mask, position, want_hidden=True)
        assert hidden is not None
        self.backbone_kv.store(rows, own, [(k[:, :, -1], v[:, :, -1]) for k, v in map(layer_kv, cache.layers)])
        h = hidden.to(self.dtype)  # (N, H)
        query, own_k, own_v = self.head.qkv_heads(h[:, None])  # (N, heads, 1, d) each
        self.head_kv.store(rows, own, [(own_k[:, :, 0], own_v[:, :, 0])])
        [(head_k, head_v)] = self.head_kv.gather(rows, slots)
        value = self.head.step(h, head_k, head_v, mask, query)  # (N,)
        child_lp = torch.full((n, self.trie.codebook_size), float("-inf"), device=self.device)
        for level in range(1, self.trie.depth):
            here = depth == level
            if here.any():
                trie_nodes = tree.trie_node[rows[here], nodes[here]]
                child_lp[here] = level_log_probs(logits[here], self.trie, level, trie_nodes)
        tree.evaluate(rows, nodes, value, child_lp)

    def add(self, rows: torch.Tensor, parents: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Allocate children (one visit each up their path); returns their ids, not yet evaluated."""
        tree = self.tree
        level = tree.depth[rows, parents]  # (N,)
        trie_nodes = self.trie.child_node(tree.trie_node[rows, parents], codes)
        nodes = tree.allocate(rows, parents, codes, trie_nodes, self.trie.level_token_ids[level, codes])
        tree.backup(rows, nodes)
        return nodes

    def initial_tree(self, target: int) -> None:
        """Beam search of width init_beams over the prefix levels, widened where needed to hold ``target``
        complete SIDs under its deepest prefixes."""
        tree, c, k = self.tree, self.trie.codebook_size, self.config.init_beams
        b = tree.size.shape[0]
        leaf_counts = self.trie.leaf_counts()
        rows = torch.arange(b, device=self.device)
        nodes = torch.zeros(b, dtype=torch.long, device=self.device)
        for _ in range(tree.max_depth):
            if self.between_steps is not None:  # after the prefill, and between levels: each is a forward
                self.between_steps()
            slot = rank_within(rows)  # (F,) position of each frontier node in its prompt
            scores = torch.full((b, int(slot.max()) + 1, c), float("-inf"), device=self.device)
            scores[rows, slot] = tree.log_prob[rows, nodes, None] + tree.child_log_prob[rows, nodes]
            if self.bonus is not None:  # each child's path log-prob plus its own node's bonus, as beam search
                kids = self.trie.child_nodes(tree.trie_node[rows, nodes]).clamp(min=0)  # (F, C)
                scores[rows, slot] += self.bonus.at(rows[:, None], kids)
            frontier = torch.full(scores.shape[:2], 0, dtype=torch.long, device=self.device)
            frontier[rows, slot] = nodes
            scores, order = scores.flatten(1).sort(dim=1, descending=True)  # (B, W*C)
            parents, codes = frontier.gather(1, order // c), order % c
            finite = torch.isfinite(scores)
            kids = self.trie.child_node(tree.trie_node.gather(1, parents), codes).clamp(min=0)
            holds = torch.where(finite, leaf_counts[kids], 0).cumsum(1)  # (B, W*C)
            width = ((holds >= target).long().argmax(1) + 1).clamp(min=k)  # (B,)
            keep = finite & (torch.arange(scores.shape[1], device=self.device)[None] < width[:, None])
            rows, pos = torch.nonzero(keep, as_tuple=True)
            if not rows.numel():  # no finite score anywhere (a diverged model): nothing to grow
                break
            nodes = self.add(rows, parents[rows, pos], codes[rows, pos])
            self.evaluate(rows, nodes)

    def run(self) -> torch.Tensor:
        """Steps 2-4 until the budget is spent, the tree is exhausted or the deadline passes; cap_hit (B,)."""
        tree, deadline = self.tree, self.config.deadline
        while True:
            active = tree.open_nodes()[:, 0] & (tree.size - 1 < self.budget)
            if not bool(active.any()):
                return torch.zeros_like(active)
            if self.between_steps is not None:
                self.between_steps()
            if deadline is not None and time.perf_counter() >= deadline:
                return active
            self.step(active)

    def step(self, active: torch.Tensor) -> None:
        """Selections until each active prompt (B,) made ``expansions_per_step`` children, then one forward. Once
        the deadline has passed the selections stop at the first child made: late in a search most selections
        fail the gate, and a step ran on for up to 40 ms past a 900 ms deadline (demo checkpoint, k = 60)."""
        tree, cfg, deadline = self.tree, self.config, self.config.deadline
        made = torch.zeros_like(self.iterations)  # expansions of this step per prompt
        new_rows, new_nodes = [], []
        need = active
        while bool(need.any()):
            selected = tree.select(need, cfg.beta)  # (B,)
            ok = need & (tree.passes_gate(selected) | (self.stall >= cfg.gate_patience))
            fail = need & ~ok
            self.iterations += need.long()
            self.failures += fail.long()
            self.stall = torch.where(fail, self.stall + 1, torch.where(ok, 0, self.stall))
            if bool(fail.any()):
                at = torch.nonzero(fail).flatten()
                tree.fail(at, selected[at])
            if bool(ok.any()):
                at = torch.nonzero(ok).flatten()
                noise = gumbel_noise(self.keys[at], tree.size[at], self.trie.codebook_size)  # keyed by the new id
                codes = tree.sample_child(at, selected[at], noise, cfg.child_temperature)
                new_rows.append(at)
                new_nodes.append(self.add(at, selected[at], codes))
                made += ok.long()
            need = need & (made < cfg.expansions_per_step) & tree.open_nodes()[:, 0] & (tree.size - 1 < self.budget)
            if new_rows and deadline is not None and time.perf_counter() >= deadline:
                break  # the search stops after this step (``run``): evaluate what it has
        self.evaluate(torch.cat(new_rows), torch.cat(new_nodes))

    def complete(self) -> torch.Tensor:
        """Every valid prefix the initial tree lacks, a level at a time; cap_hit (B,).

        For a budget that covers every prefix of the catalog (``covers_the_catalog``): the search would end
        with these very nodes (it spends its budget or exhausts the tree, and the budget cannot run out
        first), after selections that mostly fail the gate near the end (1,030 failures, 0.85 s for k = 100 on
        the demo's 600-SID catalog); only the visit counts differ, which the search's own steps add. A forward
        evaluates at most as many nodes as the initial tree's widest level could (B x max(init_beams, G)), so
        memory stays what the initial tree needs, and the deadline is checked before each.
        """
        tree, deadline, cfg = self.tree, self.config.deadline, self.config
        b = tree.size.shape[0]
        chunk = b * max(cfg.init_beams, cfg.num_candidates)
        for level in range(1, tree.max_depth + 1):
            parents = tree.live & (tree.depth == level - 1)  # (B, M)
            free = parents[..., None] & torch.isfinite(tree.child_log_prob) & (tree.child < 0)  # (B, M, C)
            rows, nodes, codes = torch.nonzero(free, as_tuple=True)
            for start in range(0, rows.numel(), chunk):
                if self.between_steps is not None:
                    self.between_steps()
                if deadline is not None and time.perf_counter() >= deadline:
                    return tree.open_nodes()[:, 0]
                part = slice(start, start + chunk)
                self.evaluate(rows[part], self.add(rows[part], nodes[part], codes[part]))
        return torch.zeros(b, dtype=torch.bool, device=self.device)

    def stats(self, cap_hit: torch.Tensor, init_tokens: torch.Tensor) -> list[VEDStats]:
        """Per prompt; the loop only ever stops on the deadline, an exhausted tree or the budget."""
        tree = self.tree
        spent = (tree.size - 1).tolist()
        still_open = tree.open_nodes()[:, 0].tolist()
        leaves = torch.isfinite(tree.candidate_log_probs()).flatten(1).sum(1).tolist()  # (B,)
        out = []
        for i, live in enumerate(tree.live):
            reason = "deadline" if cap_hit[i] else ("budget" if still_open[i] else "exhausted")
            out.append(
                VEDStats(
                    tokens_spent=spent[i],
                    nodes=int(live.sum()),
                    max_depth=self.trie.depth if leaves[i] else int(tree.depth[i][live].max()),
                    iterations=int(self.iterations[i]),
                    cap_hit=bool(cap_hit[i]),
                    budget=self.budget,
                    init_tokens=int(init_tokens[i]),
                    gate_failures=int(self.failures[i]),
                    leaves=int(leaves[i]),
                    stop_reason=reason,
                )
            )
        return out


@torch.no_grad()
def ved_search(
    model: PreTrainedModel,
    value_head: ValueHead,
    trie: SidTrie,
    input_ids: torch.Tensor,  # (B, T) left-padded prompts
    attention_mask: torch.Tensor,  # (B, T)
    config: VEDConfig,
    bonus: NodeBonus | None = None,  # (B, trie nodes): shallow fusion with transition counts
    between_steps: Callable[[], None] | None = None,  # run between steps (module doc)
) -> VEDResult:
    """Value-guided search for ``config.num_candidates`` complete SIDs per prompt (see the module doc).

    ``bonus``: shallow fusion (``models.transition``), added where beam search adds it: to the initial
    tree's prefix scores and to the returned set's ranking score; the search's own values are untouched.
    """
    if trie.depth < 2:
        raise ValueError(f"VED searches over SID prefixes: SIDs of depth {trie.depth} have none")
    budget = resolve_budget(config, trie.depth)
    search = _Search(model, value_head, trie, config, budget, int(input_ids.shape[0]), bonus, between_steps)
    search.prefill(input_ids, attention_mask)
    search.initial_tree(min(config.num_candidates, trie.num_sids))
    init_tokens = search.tree.size - 1
    cap_hit = search.complete() if covers_the_catalog(trie, budget) else search.run()
    return returned_set(search.tree, trie, config, search.stats(cap_hit, init_tokens), bonus)
