"""Item-transition counts: the count baseline, and the prior beam search fuses with the policy.

``C[x][y]`` counts the training rows whose last history item is ``x`` and whose
target is ``y``. The data sets are sliding windows over each user's timeline,
so each observed transition (one interaction followed by the next) is the
target of exactly one row and is counted once. A history ``h`` scores item
``y`` by ``S(y) = sum_k C[h_-k][y] / k`` over its last ``window`` items (the
last item weighs 1, the one before 1/2, ...); the baseline ranks items by
``S``, popularity breaking ties and filling the rest of the list.

Shallow fusion. Beam search ranks a complete SID by ``log p_policy(sid) + w *
log(1 + S(sid))`` (``S`` summed over the items that share the SID), so a row
with no observed transition is ranked by the policy alone, and the one weight
``w`` is chosen on held-out rows. A prefix at an earlier level gets ``w *
log(1 + max S)`` over the SIDs below it: an upper bound of what any of its
completions can add, so beam search does not prune a prefix that leads to a
strong transition before it reaches it, and the per-level increments telescope
to the complete SID's bonus. ``node_bonus`` builds that table per row over the
trie's nodes, holding only the nodes on those paths (``models.node_bonus``);
``models.beam_search`` adds it.

The counts are plain data: a checkpoint stores them as the extra
``transitions`` (``to_state`` / ``from_state``), so decoding needs no data set.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from models.checkpoint import LoadedCheckpoint
from models.node_bonus import NodeBonus
from models.sid_catalog import SidCatalog
from models.sid_trie import SidTrie

STATE_NAME = "transitions"  # checkpoint extra that holds the counts


class TransitionCounts:
    def __init__(self, counts: dict[int, Counter[int]], window: int = 3) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.counts = counts
        self.window = window

    @classmethod
    def fit(cls, rows: Iterable[tuple[Sequence[int], int]], window: int = 3) -> TransitionCounts:
        """Count (last history item -> target) over ``(history, target)`` rows; empty histories count nothing."""
        counts: dict[int, Counter[int]] = defaultdict(Counter)
        for history, target in rows:
            if history:
                counts[int(history[-1])][int(target)] += 1
        return cls(dict(counts), window)

    def counted(self, history: Sequence[int], target: int) -> bool:
        """Whether the row ``(history, target)``'s own transition (last history item -> target) is counted."""
        return bool(history) and self.counts.get(int(history[-1]), Counter())[int(target)] > 0

    @property
    def num_pairs(self) -> int:
        return sum(len(c) for c in self.counts.values())

    def scores(self, history: Sequence[int], leave_out: int | None = None) -> dict[int, float]:
        """``S(y)`` for every item ``y`` that followed one of the last ``window`` history items.

        ``leave_out``: the row's own target, when the row itself was counted (RL rollouts on rows the counts
        were fit on): its one transition from the last history item is taken back, so the row's answer scores
        only what the other rows gave it. That count adds ``1 / k`` at every position ``k`` of the window that
        holds the last item (a history ``(x, x)`` scores it at 1 and 1/2), and all of it is taken back.
        """
        out: dict[int, float] = defaultdict(float)
        window = [int(item) for item in reversed(history[-self.window :])]
        for k, item in enumerate(window, start=1):
            for nxt, c in self.counts.get(item, {}).items():
                out[nxt] += c / k
        if leave_out is not None and history:
            last, target = window[0], int(leave_out)
            if self.counts.get(last, Counter())[target] < 1:
                raise ValueError(f"leave_out: the transition {last} -> {target} was never counted")
            out[target] -= sum(1.0 / k for k, item in enumerate(window, start=1) if item == last)
            if out[target] <= 1e-9:
                del out[target]
        return out

    def rank_items(self, history: Sequence[int], popular: Sequence[int], depth: int) -> list[int]:
        """The ``depth`` best items: by score, ties by the order of ``popular``, then ``popular`` fills the rest."""
        scored = self.scores(history)
        pop_rank = {item: r for r, item in enumerate(popular)}
        # a score is a sum of count / k (k <= window): times lcm(1..window) an integer, so equal scores tie
        # exactly (summed as floats, 1 + 2/3 and 5/3 differ in the last bit and skipped the popularity tie-break)
        scale = math.lcm(*range(1, self.window + 1))
        top = sorted(scored, key=lambda i: (-round(scored[i] * scale), pop_rank.get(i, len(pop_rank)), i))[:depth]
        seen = set(top)
        for item in popular:
            if len(top) >= depth:
                break
            if item not in seen:
                top.append(item)
                seen.add(item)  # an item ``popular`` names twice takes one place
        return top

    def sid_scores(self, history: Sequence[int], catalog: SidCatalog, leave_out: int | None = None) -> dict[int, float]:
        """``S`` per SID index: the scores of the items that share it, summed (``leave_out``: ``scores``)."""
        out: dict[int, float] = defaultdict(float)
        for item, s in self.scores(history, leave_out).items():
            if item in catalog.items:
                out[catalog.sid_index[catalog.items[item].sid]] += s
        return out

    def node_bonus(
        self,
        histories: Sequence[Sequence[int]],
        catalog: SidCatalog,
        trie: SidTrie,
        weight: float,
        leave_out: Sequence[int | None] | None = None,
    ) -> NodeBonus:
        """The (B, nodes) fusion bonus ``weight * log(1 + max S)`` below each trie node, 0 where nothing followed,
        held sparse (``models.node_bonus``); ``leave_out``: each row's own target, for rows the counts include
        (``scores``), None for a row they do not."""
        if leave_out is not None and len(leave_out) != len(histories):
            raise ValueError(f"{len(leave_out)} leave-out targets for {len(histories)} histories")
        rows: list[int] = []
        sids: list[int] = []
        scores: list[float] = []
        for row, history in enumerate(histories):
            scored = self.sid_scores(history, catalog, None if leave_out is None else leave_out[row])
            rows += [row] * len(scored)
            sids += scored
            scores += scored.values()
        dev = trie.device
        row_of = torch.tensor(rows, dtype=torch.long, device=dev)
        node = trie.sid_node[torch.tensor(sids, dtype=torch.long, device=dev)]
        value = torch.log1p(torch.tensor(scores, dtype=torch.float32, device=dev)) * weight
        if trie.num_sids < len(catalog.sids):  # a SID the trie does not hold (``SidTrie``'s keep): no bonus to carry
            held = node >= 0
            row_of, node, value = row_of[held], node[held], value[held]
        path = [node]  # the leaf, then each ancestor up to the root: each holds the max below it
        for _ in range(trie.depth):
            path.append(trie.parent[path[-1]])
        depth = len(path)
        return NodeBonus.from_entries(
            row_of.repeat(depth), torch.cat(path), value.repeat(depth), len(histories), trie.num_nodes
        )

    def to_state(self) -> dict[str, torch.Tensor]:
        src = [x for x, c in self.counts.items() for _ in c]
        dst = [y for c in self.counts.values() for y in c]
        n = [v for c in self.counts.values() for v in c.values()]
        return {
            "src": torch.tensor(src, dtype=torch.long),
            "dst": torch.tensor(dst, dtype=torch.long),
            "count": torch.tensor(n, dtype=torch.long),
            "window": torch.tensor(self.window),
        }

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> TransitionCounts:
        counts: dict[int, Counter[int]] = defaultdict(Counter)
        for x, y, n in zip(state["src"].tolist(), state["dst"].tolist(), state["count"].tolist(), strict=True):
            counts[x][y] = n
        return cls(dict(counts), int(state["window"]))


@dataclass(frozen=True)
class ShallowFusion:
    """Beam search fused with transition counts at ``weight`` (chosen on held-out rows)."""

    counts: TransitionCounts
    weight: float

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"fusion weight must be >= 0, got {self.weight}")

    def node_bonus(
        self,
        histories: Sequence[Sequence[int]],
        catalog: SidCatalog,
        trie: SidTrie,
        leave_out: Sequence[int | None] | None = None,
    ) -> NodeBonus:
        return self.counts.node_bonus(histories, catalog, trie, self.weight, leave_out)


def checkpoint_fusion(checkpoint: LoadedCheckpoint, weight: float | None = None) -> ShallowFusion | None:
    """The shallow fusion a checkpoint was selected with, or with ``weight`` instead; None when off.

    ``weight`` None takes the checkpoint's chosen weight (none chosen: off); a
    weight above 0 needs the checkpoint's transition counts.
    """
    chosen = checkpoint.manifest.get("fusion") or {}
    w = float(chosen.get("weight", 0.0)) if weight is None else weight
    if w == 0:
        return None
    state = checkpoint.extras.get(STATE_NAME)
    if state is None:
        raise ValueError(f"checkpoint {checkpoint.path} has no transition counts to fuse with at weight {w}")
    return ShallowFusion(TransitionCounts.from_state(state), w)
