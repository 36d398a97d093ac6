"""Per-prompt prefix trees of VED, held as (B, M) tensors so no step loops over prompts.

Node 0 of every prompt is the root (the prompt's last token, depth 0); node n
of prompt b has ``parent[b, n]``, its level code ``code[b, n]``, the trie node it
stands for, its vocabulary ``token``, and ``path[b, n, j]``: the node at depth
j + 1 on its path (itself at j = depth - 1). A node is *allocated* when it is
chosen and *live* once the backbone has evaluated it (value, policy over its
children); pending nodes are never descended into.

The quantities of issue 3 (C):

* ``score`` = G(s) = V(s) + lam * H(s), H the policy's entropy over the valid
  next tokens renormalised over them (``valid_entropy``; 0 at a complete SID);
* ``u_score`` = U(s) = G(s) + beta * sqrt(ln(N_root + 1) / (N(s) + 1));
* ``passes_gate``: G(s) >= the mean G of the live nodes at s's depth (a 1e-6
  tolerance, so ties pass; the root always passes);
* ``backup``: one visit for every node on the path root..n. Creating a node is
  a visit of it and its ancestors, so after the initial tree N(s) is the size
  of s's subtree (the root: the number of nodes below it).

Selection (``select``) starts at the root. At a node s the arms are its live
children whose subtree is still open (``open_nodes``) and s itself if it has
an unexpanded valid code; each arm is scored by U, s itself by its own U(s)
(ties go to s). Descending stops at the node whose own arm wins, which is the
*selected node*. Letting a node compete with its children is what allows
widening at any depth (a new level-1 prefix is a child of the root); in a
tree where only childless nodes could be selected, beam search's pruned
branches could never come back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GATE_TOLERANCE = 1e-6


def valid_entropy(level_log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy over the finite entries, renormalised over them: (N, C) -> (N,); 0 where none."""
    valid = torch.isfinite(level_log_probs)  # (N, C)
    norm = level_log_probs.logsumexp(dim=-1, keepdim=True)  # (N, 1)
    logp = level_log_probs - norm  # (N, C)
    return -torch.where(valid, logp.exp() * logp, 0.0).sum(-1)


def rank_within(rows: torch.Tensor) -> torch.Tensor:
    """For each entry, how many earlier entries share its row: (N,) -> (N,)."""
    same = rows[:, None] == rows[None, :]  # (N, N)
    return same.tril(-1).sum(1)


@dataclass
class SearchTree:
    parent: torch.Tensor  # (B, M) -1 at the root and free slots
    depth: torch.Tensor  # (B, M) 0 at the root
    code: torch.Tensor  # (B, M) level code of the node's last token, -1 at the root
    trie_node: torch.Tensor  # (B, M)
    token: torch.Tensor  # (B, M) vocabulary id, -1 at the root
    path: torch.Tensor  # (B, M, D) node at depth j + 1 on the node's path, -1 below its depth
    log_prob: torch.Tensor  # (B, M) policy log-prob of the path (full-vocabulary softmax, as beam search)
    value: torch.Tensor  # (B, M) V(s)
    entropy: torch.Tensor  # (B, M) H(s)
    score: torch.Tensor  # (B, M) G(s)
    visits: torch.Tensor  # (B, M) N(s)
    live: torch.Tensor  # (B, M) evaluated by the backbone
    n_valid: torch.Tensor  # (B, M) valid next codes
    n_children: torch.Tensor  # (B, M) allocated children
    child: torch.Tensor  # (B, M, C) child node per code, -1 if not expanded
    child_log_prob: torch.Tensor  # (B, M, C) policy log-probs of the next codes, -inf where invalid
    size: torch.Tensor  # (B,) allocated nodes, root included
    lam: float
    # expandable / open masks, valid until the next allocate or evaluate (visits do not change them)
    _masks: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def empty(
        cls, batch: int, capacity: int, codebook_size: int, max_depth: int, lam: float, device: torch.device
    ) -> SearchTree:
        """Trees holding only their (not yet evaluated) root."""

        def full(*shape: int, fill: float = 0, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.full((batch, *shape), fill, dtype=dtype, device=device)

        return cls(
            parent=full(capacity, fill=-1),
            depth=full(capacity),
            code=full(capacity, fill=-1),
            trie_node=full(capacity),
            token=full(capacity, fill=-1),
            path=full(capacity, max_depth, fill=-1),
            log_prob=full(capacity, dtype=torch.float),
            value=full(capacity, dtype=torch.float),
            entropy=full(capacity, dtype=torch.float),
            score=full(capacity, dtype=torch.float),
            visits=full(capacity, dtype=torch.float),
            live=full(capacity, dtype=torch.bool),
            n_valid=full(capacity),
            n_children=full(capacity),
            child=full(capacity, codebook_size, fill=-1),
            child_log_prob=full(capacity, codebook_size, fill=float("-inf"), dtype=torch.float),
            size=torch.ones(batch, dtype=torch.long, device=device),
            lam=lam,
        )

    @property
    def max_depth(self) -> int:
        return int(self.path.shape[-1])

    def allocate(
        self,
        rows: torch.Tensor,  # (N,) prompt of each new node
        parents: torch.Tensor,  # (N,) live parent node
        codes: torch.Tensor,  # (N,) unexpanded valid code of the parent
        trie_nodes: torch.Tensor,  # (N,)
        tokens: torch.Tensor,  # (N,)
    ) -> torch.Tensor:
        """Add children (not yet live); returns their node ids (N,). Rows may repeat."""
        idx = self.size[rows] + rank_within(rows)  # (N,)
        assert bool((idx < self.parent.shape[1]).all()), "tree capacity exceeded"
        assert bool((self.child[rows, parents, codes] < 0).all()), "code already expanded"
        self.size += torch.bincount(rows, minlength=self.size.shape[0])
        depth = self.depth[rows, parents] + 1  # (N,)
        self.parent[rows, idx] = parents
        self.depth[rows, idx] = depth
        self.code[rows, idx] = codes
        self.trie_node[rows, idx] = trie_nodes
        self.token[rows, idx] = tokens
        self.log_prob[rows, idx] = self.log_prob[rows, parents] + self.child_log_prob[rows, parents, codes]
        path = self.path[rows, parents]  # (N, D)
        path[torch.arange(len(rows), device=rows.device), depth - 1] = idx
        self.path[rows, idx] = path
        self.child[rows, parents, codes] = idx
        self.n_children.index_put_((rows, parents), torch.ones_like(rows), accumulate=True)
        self._masks = None
        return idx

    def evaluate(
        self, rows: torch.Tensor, nodes: torch.Tensor, value: torch.Tensor, child_log_prob: torch.Tensor
    ) -> None:
        """Make nodes live: V (N,) and the policy's log-probs over their next codes (N, C)."""
        entropy = valid_entropy(child_log_prob)  # (N,)
        self.value[rows, nodes] = value.float()
        self.entropy[rows, nodes] = entropy
        self.score[rows, nodes] = value.float() + self.lam * entropy
        self.child_log_prob[rows, nodes] = child_log_prob
        self.n_valid[rows, nodes] = torch.isfinite(child_log_prob).sum(-1)
        self.live[rows, nodes] = True
        self._masks = None

    def _expandable_and_open(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._masks is None:
            expandable = self.live & (self.n_valid > self.n_children)  # (B, M)
            is_open = expandable.clone()
            for d in range(self.max_depth, 0, -1):
                up = (is_open & (self.depth == d)).long()  # (B, M)
                is_open |= torch.zeros_like(up).scatter_add_(1, self.parent.clamp(min=0), up) > 0
            self._masks = (expandable, is_open & self.live)
        return self._masks

    def expandable(self) -> torch.Tensor:
        """Live nodes with a valid code not expanded yet: (B, M)."""
        return self._expandable_and_open()[0]

    def open_nodes(self) -> torch.Tensor:
        """Live nodes whose live subtree still holds an expandable node: (B, M)."""
        return self._expandable_and_open()[1]

    def depth_mean(self) -> torch.Tensor:
        """Mean G of the live nodes at each depth: (B, D + 1); NaN at an empty depth."""
        live = self.live.float()  # (B, M)
        total = torch.zeros(self.live.shape[0], self.max_depth + 1, device=live.device)  # (B, D+1)
        count = total.clone().scatter_add_(1, self.depth, live)
        return total.scatter_add_(1, self.depth, self.score * live) / count

    def u_score(self, beta: float) -> torch.Tensor:
        """U(s) = G(s) + beta * sqrt(ln(N_root + 1) / (N(s) + 1)) of every node: (B, M)."""
        n_root = self.visits[:, :1]  # (B, 1)
        return self.score + beta * torch.sqrt(torch.log(n_root + 1) / (self.visits + 1))

    def select(self, rows: torch.Tensor, beta: float) -> torch.Tensor:
        """Descend by U from the root in the prompts ``rows`` (B,) bool; the selected node (B,), -1 elsewhere."""
        b = self.size.shape[0]
        ar = torch.arange(b, device=rows.device)
        is_open = self.open_nodes()  # (B, M)
        expandable = self.expandable()  # (B, M)
        u = self.u_score(beta)  # (B, M)
        moving = rows & is_open[:, 0]
        cur = torch.zeros(b, dtype=torch.long, device=rows.device)
        selected = torch.full_like(cur, -1)
        for _ in range(self.max_depth):  # a complete SID is never open: the descent ends above it
            kids = self.child[ar, cur]  # (B, C)
            usable = (kids >= 0) & is_open.gather(1, kids.clamp(min=0))  # (B, C)
            u_kids = torch.where(usable, u.gather(1, kids.clamp(min=0)), float("-inf"))  # (B, C)
            best_u, best = u_kids.max(dim=-1)  # (B,)
            u_self = torch.where(expandable[ar, cur], u[ar, cur], float("-inf"))  # (B,)
            stop = moving & (u_self >= best_u)
            selected = torch.where(stop, cur, selected)
            moving &= ~stop
            cur = torch.where(moving, kids.gather(1, best[:, None])[:, 0], cur)
        assert not bool(moving.any()), "descent did not stop"
        return selected

    def passes_gate(self, nodes: torch.Tensor) -> torch.Tensor:
        """G(s) >= mean G of s's depth, for one node per prompt (B,); False where nodes is -1."""
        ar = torch.arange(nodes.shape[0], device=nodes.device)
        n = nodes.clamp(min=0)
        mean = self.depth_mean()[ar, self.depth[ar, n]]  # (B,)
        return (nodes >= 0) & (self.score[ar, n] >= mean - GATE_TOLERANCE)

    def backup(self, rows: torch.Tensor, nodes: torch.Tensor) -> None:
        """One visit for every node on the path root..node of each (row, node) pair (N,)."""
        on_path = self.path[rows, nodes]  # (N, D)
        hit = torch.zeros_like(self.visits)
        index = (rows[:, None].expand_as(on_path), on_path.clamp(min=0))
        hit.index_put_(index, (on_path >= 0).float(), accumulate=True)
        hit[:, 0] += torch.bincount(rows, minlength=hit.shape[0])
        self.visits += hit

    def sample_child(self, rows: torch.Tensor, nodes: torch.Tensor, gumbel: torch.Tensor) -> torch.Tensor:
        """Gumbel-max draw of an unexpanded valid code of each node (N,), gumbel (N, C): (N,) codes.

        Equals sampling from the policy renormalised over the node's
        not-yet-expanded valid codes.
        """
        lp = self.child_log_prob[rows, nodes]  # (N, C)
        free = torch.isfinite(lp) & (self.child[rows, nodes] < 0)  # (N, C)
        assert bool(free.any(-1).all()), "no unexpanded code to sample"
        return torch.where(free, lp + gumbel, float("-inf")).argmax(-1)

    def ranked_leaves(self, k: int) -> torch.Tensor:
        """Top-k live complete SIDs per prompt by value, then path log-prob, then node id: (B, k), -1 pad."""
        leaf = self.live & (self.depth == self.max_depth)  # (B, M)
        neg_inf = float("-inf")
        by_lp = torch.where(leaf, self.log_prob, neg_inf).sort(dim=1, descending=True, stable=True).indices  # (B, M)
        value = torch.where(leaf, self.value, neg_inf).gather(1, by_lp)  # (B, M) in log-prob order
        by_value = value.sort(dim=1, descending=True, stable=True).indices
        order = by_lp.gather(1, by_value)  # (B, M)
        top = order[:, :k]
        top = torch.where(leaf.gather(1, top), top, -1)
        if top.shape[1] < k:
            top = torch.cat([top, top.new_full((top.shape[0], k - top.shape[1]), -1)], dim=1)
        return top
