"""Per-prompt prefix trees of VED, held as (B, M) tensors so no step loops over prompts.

Node 0 of every prompt is the root (the prompt's last token, depth 0); node n
of prompt b has ``parent[b, n]``, its level code ``code[b, n]``, the trie node it
stands for, its vocabulary ``token``, and ``path[b, n, j]``: the node at depth
j + 1 on its path (itself at j = depth - 1). A node is *allocated* when it is
chosen and *live* once the backbone has evaluated it (value, policy over its
children); pending nodes are never descended into.

Nodes are SID *prefixes*, depth 0 .. ``max_depth`` (the SID depth less one): a
complete SID is never a node, as beam search never feeds one to the backbone.
The complete SIDs under a live node of depth ``max_depth`` are known, with
their path log-probs, the moment that node is evaluated: they are VED's
candidates (``candidate_log_probs``).

The quantities of V-STAR's VED (part C), as reworked (``models.ved``):

* ``score`` = G(s) = V(s) + lam * H(s), H the policy's entropy over the valid
  next tokens renormalised over them (``valid_entropy``);
* ``normalised_score`` = G standardised over the live nodes of s's depth in its
  own tree, (G - mean) / std (0 where the depth has no spread). Raw G is not
  comparable across depths (lam * H is several times larger near the root) and
  its spread (std about 0.1) is dwarfed by a bonus of 0.2 - 1.0, so with raw G
  the visit counts alone steered; standardised, beta is in units of G's spread;
* ``u_score`` = U(s) = Ĝ(s) + beta * sqrt(ln(N_root + 1) / (N(s) + 1)), the arm
  of child s during the descent;
* ``self_u_score``: the arm "expand s itself" (a new child of s), scored
  Ĝ(s) + beta * sqrt(ln(N_root + 1) / (E(s) + 1)) with E(s) = ``self_visits``,
  the selections that stopped at s (its children, the initial tree's
  included, plus gate failures). With N(s) here, as before, the arm's bonus was
  always the smallest (N(s) >= N(child) + 1): no node ever widened, the root
  included; counted on its own, it widens as a bandit arm does;
* ``passes_gate``: G(s) >= the mean G of the live nodes at s's depth (a 1e-6
  tolerance, so ties pass; the root always passes);
* ``backup``: one visit for every node on the path root..n. Creating a node is
  a visit of it and its ancestors, so after the initial tree N(s) is the size
  of s's subtree (the root: the number of nodes below it).

Selection (``select``) starts at the root. At a node s the arms are its live
children whose subtree is still open (``open_nodes``) and s itself if it has
an unexpanded valid code (ties go to s). Descending stops at the node whose
own arm wins, which is the *selected node*; a new level-1 prefix is a child of
the root, so the search can widen at every depth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GATE_TOLERANCE = 1e-6
SPREAD_FLOOR = 1e-6  # a depth whose G varies less than this has no spread: Ĝ = 0 there


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


def sum_by_depth(x: torch.Tensor, depth: torch.Tensor, levels: int, by_reduction: bool | None = None) -> torch.Tensor:
    """Per row, the sum of ``x`` over the entries of each depth: (B, M) -> (B, levels).

    On CUDA a scatter-add adds floats atomically, in an order that varies from run to run, so a near tie
    downstream could break either way; there (``by_reduction`` None: on CUDA) each depth is summed by a
    reduction of its own, in a fixed order. Elsewhere the scatter-add's sequential sum is kept, which the
    reported CPU figures were measured with.
    """
    if x.is_cuda if by_reduction is None else by_reduction:
        return torch.stack([torch.where(depth == d, x, 0.0).sum(1) for d in range(levels)], dim=1)
    return torch.zeros(x.shape[0], levels, dtype=x.dtype, device=x.device).scatter_add(1, depth, x)


def standardise_by_depth(x: torch.Tensor, depth: torch.Tensor, live: torch.Tensor, levels: int) -> torch.Tensor:
    """(x - mean) / std over the live entries of the same depth in each row: (B, M) -> (B, M), 0 off live.

    Population std; 0 where a depth has a single live entry or no spread. The variance is the mean of squared
    deviations, not E[x^2] - mean^2, which in float32 loses the spread of values far from 0 (at 1000 +- 0.05 it
    left none: every z was 0).
    """
    w = live.float()  # (B, M)
    count = sum_by_depth(w, depth, levels).clamp(min=1)  # (B, levels)
    mean = (sum_by_depth(x * w, depth, levels) / count).gather(1, depth)  # (B, M) its depth's mean
    deviation = (x - mean) * w
    var = sum_by_depth(deviation * deviation, depth, levels) / count
    std = var.sqrt().gather(1, depth)  # (B, M)
    z = (x - mean) / std.clamp(min=SPREAD_FLOOR)
    return torch.where(live & (std > SPREAD_FLOOR), z, 0.0)


@dataclass
class SearchTree:
    parent: torch.Tensor  # (B, M) -1 at the root and free slots
    depth: torch.Tensor  # (B, M) 0 at the root
    code: torch.Tensor  # (B, M) level code of the node's last token, -1 at the root
    trie_node: torch.Tensor  # (B, M)
    token: torch.Tensor  # (B, M) vocabulary id, -1 at the root
    path: torch.Tensor  # (B, M, max_depth) node at depth j + 1 on the node's path, -1 below its depth
    log_prob: torch.Tensor  # (B, M) policy log-prob of the path (full-vocabulary softmax, as beam search)
    value: torch.Tensor  # (B, M) V(s)
    entropy: torch.Tensor  # (B, M) H(s)
    score: torch.Tensor  # (B, M) G(s)
    visits: torch.Tensor  # (B, M) N(s)
    self_visits: torch.Tensor  # (B, M) E(s): selections of s's own arm (children made + gate failures at s)
    live: torch.Tensor  # (B, M) evaluated by the backbone
    n_valid: torch.Tensor  # (B, M) valid next codes
    n_children: torch.Tensor  # (B, M) allocated children
    child: torch.Tensor  # (B, M, C) child node per code, -1 if not expanded
    child_log_prob: torch.Tensor  # (B, M, C) policy log-probs of the next codes, -inf where invalid
    size: torch.Tensor  # (B,) allocated nodes, root included
    lam: float
    # expandable / open masks, valid until the next allocate or evaluate (visits do not change them)
    _masks: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    # Ĝ and the mean G per depth, valid until the next evaluate (only G and liveness enter them)
    _by_depth: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def empty(
        cls, batch: int, capacity: int, codebook_size: int, max_depth: int, lam: float, device: torch.device
    ) -> SearchTree:
        """Trees holding only their (not yet evaluated) root; nodes go down to depth ``max_depth``."""

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
            self_visits=full(capacity, dtype=torch.float),
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
        assert bool((self.depth[rows, parents] < self.max_depth).all()), "a complete SID is never a node"
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
        ones = torch.ones_like(rows)
        self.n_children.index_put_((rows, parents), ones, accumulate=True)
        self.self_visits.index_put_((rows, parents), ones.float(), accumulate=True)
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
        self._by_depth = None

    def _expandable_and_open(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._masks is None:
            expandable = self.live & (self.depth < self.max_depth) & (self.n_valid > self.n_children)  # (B, M)
            is_open = expandable.clone()
            for d in range(self.max_depth, 0, -1):
                up = (is_open & (self.depth == d)).long()  # (B, M)
                is_open |= torch.zeros_like(up).scatter_add_(1, self.parent.clamp(min=0), up) > 0
            self._masks = (expandable, is_open & self.live)
        return self._masks

    def expandable(self) -> torch.Tensor:
        """Live prefixes above ``max_depth`` with a valid code not expanded yet: (B, M)."""
        return self._expandable_and_open()[0]

    def open_nodes(self) -> torch.Tensor:
        """Live nodes whose live subtree still holds an expandable node: (B, M)."""
        return self._expandable_and_open()[1]

    def _scores_by_depth(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._by_depth is None:
            live = self.live.float()  # (B, M)
            levels = self.max_depth + 1
            mean = sum_by_depth(self.score * live, self.depth, levels) / sum_by_depth(live, self.depth, levels)
            self._by_depth = (standardise_by_depth(self.score, self.depth, self.live, levels), mean)
        return self._by_depth

    def depth_mean(self) -> torch.Tensor:
        """Mean G of the live nodes at each depth: (B, max_depth + 1); NaN at an empty depth."""
        return self._scores_by_depth()[1]

    def normalised_score(self) -> torch.Tensor:
        """Ĝ: G standardised over the live nodes of the same depth in each tree: (B, M)."""
        return self._scores_by_depth()[0]

    def _bonus(self, beta: float, counts: torch.Tensor) -> torch.Tensor:
        n_root = self.visits[:, :1]  # (B, 1)
        return beta * torch.sqrt(torch.log(n_root + 1) / (counts + 1))

    def u_score(self, beta: float) -> torch.Tensor:
        """U(s) = Ĝ(s) + beta * sqrt(ln(N_root + 1) / (N(s) + 1)) of every node: (B, M)."""
        return self.normalised_score() + self._bonus(beta, self.visits)

    def self_u_score(self, beta: float) -> torch.Tensor:
        """The "expand me" arm of every node, Ĝ(s) + beta * sqrt(ln(N_root + 1) / (E(s) + 1)): (B, M)."""
        return self.normalised_score() + self._bonus(beta, self.self_visits)

    def select(self, rows: torch.Tensor, beta: float) -> torch.Tensor:
        """Descend by U from the root in the prompts ``rows`` (B,) bool; the selected node (B,), -1 elsewhere."""
        b = self.size.shape[0]
        ar = torch.arange(b, device=rows.device)
        is_open = self.open_nodes()  # (B, M)
        expandable = self.expandable()  # (B, M)
        g_hat = self.normalised_score()  # (B, M)
        u = g_hat + self._bonus(beta, self.visits)  # (B, M)
        u_own = g_hat + self._bonus(beta, self.self_visits)  # (B, M)
        moving = rows & is_open[:, 0]
        cur = torch.zeros(b, dtype=torch.long, device=rows.device)
        selected = torch.full_like(cur, -1)
        for _ in range(self.max_depth + 1):  # the deepest nodes are never open: the descent ends above them
            kids = self.child[ar, cur]  # (B, C)
            usable = (kids >= 0) & is_open.gather(1, kids.clamp(min=0))  # (B, C)
            u_kids = torch.where(usable, u.gather(1, kids.clamp(min=0)), float("-inf"))  # (B, C)
            best_u, best = u_kids.max(dim=-1)  # (B,)
            u_self = torch.where(expandable[ar, cur], u_own[ar, cur], float("-inf"))  # (B,)
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

    def fail(self, rows: torch.Tensor, nodes: torch.Tensor) -> None:
        """A gate-failed selection of ``nodes`` (N,): a visit up their paths and one of their own arms."""
        self.backup(rows, nodes)
        self.self_visits.index_put_((rows, nodes), torch.ones_like(nodes, dtype=torch.float), accumulate=True)

    def sample_child(
        self, rows: torch.Tensor, nodes: torch.Tensor, gumbel: torch.Tensor, temperature: float = 1.0
    ) -> torch.Tensor:
        """Gumbel-max draw of an unexpanded valid code of each node (N,), gumbel (N, C): (N,) codes.

        Equals sampling from the policy at ``temperature`` renormalised over the
        node's not-yet-expanded valid codes; temperature 0 takes the most likely one.
        """
        lp = self.child_log_prob[rows, nodes]  # (N, C)
        free = torch.isfinite(lp) & (self.child[rows, nodes] < 0)  # (N, C)
        assert bool(free.any(-1).all()), "no unexpanded code to sample"
        return torch.where(free, lp + temperature * gumbel, float("-inf")).argmax(-1)

    def candidate_log_probs(self) -> torch.Tensor:
        """Path log-prob of every complete SID under a live node of depth ``max_depth``: (B, M, C), -inf elsewhere."""
        frontier = self.live & (self.depth == self.max_depth)  # (B, M)
        lp = self.log_prob[..., None] + self.child_log_prob  # (B, M, C)
        return torch.where(frontier[..., None], lp, float("-inf"))
