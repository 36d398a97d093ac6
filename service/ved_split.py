"""How the model thread divides one VED group: searched, answered by the initial beam, or shed.

``service.decode_scheduler`` decodes a group in this order: the fallbacks'
initial beam first (their deadlines are the nearest), answered at once, then
one VED search of the rest, which must build its whole initial tree before it
can stop. So the split is costed as it will run, with the learnt costs of
``service.deadline.BatchCost`` for the part's own size:

* a fallback is answered when the beam of the ``f`` fallbacks ends: its time
  to the hard cap must cover ``beam(f)``;
* a searched job's tree ends after that beam and the tree of the ``s`` jobs
  searched: its time to its deadline (or its hard cap, if sooner) must cover
  ``beam(f) + tree(s)`` (``beam(0)`` is 0: no fallback, no beam first);
* the others are shed (answered from popularity at once, no model work).

Costing every kept job as the tree of the whole kept group (as this did
before) searched jobs whose tree, after the fallbacks' beam, ended past their
deadline, up to past their hard cap (popularity, the search thrown away),
and sent to the beam jobs whose tree of the few searched would have fitted.

The choice: jobs are ordered by time to their hard cap, the most first; the
searched are a prefix of that order and the fallbacks the next ones (the jobs
with the most time get the dearest decode; where the deadlines are one margin
before the caps, as the service sets them, the margin learnt and so about the
same for jobs batched together, no split in another order does better:
``tests/service/test_ved_split.py`` checks it against every assignment). Of
the splits that meet the conditions above, it takes the one that answers the
most jobs from the model,
and of those the one that searches the most: popularity is the worst answer,
the initial beam the next. All-fallback is the old admission (the most m jobs
that all cover ``beam(m)``), so no job it kept is shed now; a job it shed is
kept where a split with fewer beams answers it. Jobs without a deadline or a
hard cap (``vstar recommend``'s offline batches, of any size) have infinite
time: all are searched, at the scan's first step. A served group has at most
``batch_max_size`` jobs: the scan, quadratic, is a few hundred comparisons, each
cost read once per size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class VEDSplit:
    """Indices into the group's jobs, each part in the group's order."""

    searched: list[int]
    fallen: list[int]  # answered by the initial beam
    shed: list[int]  # answered from popularity, not decoded


def split_ved_group(
    to_deadline: Sequence[float],  # seconds left to each job's search deadline (inf: none)
    to_cap: Sequence[float],  # seconds left to each job's hard cap (inf: none)
    tree_s: Callable[[int], float],  # the initial tree's learnt cost for n prompts
    beam_s: Callable[[int], float],  # the initial beam's
) -> VEDSplit:
    """The split of the module docstring."""
    n = len(to_cap)
    assert len(to_deadline) == n
    order = sorted(range(n), key=lambda i: -to_cap[i])  # stable: ties keep the group's order
    tree, beam = functools.cache(tree_s), functools.cache(beam_s)
    soonest = [math.inf]  # soonest[s]: the least time to a deadline of the first s in order (a search's own cap)
    for i in order:
        soonest.append(min(soonest[-1], to_deadline[i], to_cap[i]))
    for m in range(n, 0, -1):  # jobs kept
        for s in range(m, -1, -1):  # of them searched
            before = beam(m - s) if s < m else 0.0  # the fallbacks' beam, decoded first
            if s < m and to_cap[order[m - 1]] < before:  # the fallback with the least time misses its cap
                continue
            if s and soonest[s] < before + tree(s):
                continue
            return VEDSplit(sorted(order[:s]), sorted(order[s:m]), sorted(order[m:]))
    return VEDSplit([], [], sorted(order))
