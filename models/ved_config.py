"""VED's settings and what a search reports: ``VEDConfig``, its token budget, ``VEDStats``.

Kept apart from the search (``models.ved``) so that trainers, checkpoints and
the service read and store VED's settings without the search itself. An RL
checkpoint stores the ``VEDConfig`` it trained with
(``manifest["rl_config"]["ved_config"]``); ``checkpoint_ved_config`` reads it
back. ``initial_beam_stats`` is what the anytime fallback (beam search in
place of VED's initial tree) spent, reported as VED reports a search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from models.checkpoint import CheckpointError, LoadedCheckpoint
from models.sid_trie import SidTrie

BUDGET_MULTIPLE = 2


@dataclass(frozen=True)
class VEDConfig:
    num_candidates: int = 16  # G: complete SIDs returned
    init_beams: int = 16  # width of the initial constrained beam search (over the prefix levels)
    budget: int | None = None  # backbone tokens per prompt; None: see resolve_budget
    lam: float = 0.1  # entropy weight in G(s) = V(s) + lam * H(s)
    beta: float = 1.0  # exploration weight in U(s)
    seed: int = 0
    deadline: float | None = None  # time.perf_counter() value after which no new step starts
    expansions_per_step: int = 4  # children made per prompt per batched forward (gate-failed selections not counted)
    gate_patience: int = 16  # consecutive gate failures after which one expansion skips the gate
    child_temperature: float = 1.0  # the new child's draw: 1 the policy, 0 its most likely unexpanded code
    value_weight: float = 0.0  # ranking: path log-prob + value_weight * standardised V of the parent prefix
    explore_slots: int = 0  # the last slots of the returned set go to first-level codes not yet in it

    def __post_init__(self) -> None:
        counts = ("num_candidates", "init_beams", "expansions_per_step", "gate_patience", "explore_slots", "seed")
        kinds = {name: (int, "an integer") for name in counts} | {
            name: (int | float, "a number") for name in ("lam", "beta", "child_temperature", "value_weight")
        }
        if self.budget is not None:
            kinds["budget"] = (int, "an integer")
        if self.deadline is not None:
            kinds["deadline"] = (int | float, "a number")
        for name, (kind, what) in kinds.items():  # a stored config may hold anything JSON does
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"{name} must be {what}, got {value!r}")
        for name in ("num_candidates", "init_beams", "expansions_per_step", "gate_patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget must be >= 1, got {self.budget}")
        for name in ("lam", "beta", "child_temperature", "value_weight"):  # JSON may hold NaN and Infinity
            if not 0 <= getattr(self, name) < math.inf:  # NaN fails both comparisons
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if self.deadline is not None and math.isnan(self.deadline):
            raise ValueError("deadline must be a time.perf_counter() value or None, got nan")
        if not 0 <= self.explore_slots <= self.num_candidates:
            raise ValueError(f"explore_slots must be in [0, num_candidates], got {self.explore_slots}")


def checkpoint_ved_config(
    checkpoint: LoadedCheckpoint,
    num_candidates: int,
    budget: int | None = None,
    seed: int = 0,
    explore_slots: int | None = None,
) -> VEDConfig:
    """The VED settings ``checkpoint`` was trained with (an RL checkpoint's ``manifest["rl_config"]["ved_config"]``;
    ``VEDConfig``'s defaults where it stores none), for ``num_candidates`` SIDs; ``budget`` and ``explore_slots``
    override the stored ones when given."""
    rl_config = checkpoint.manifest.get("rl_config") or {}
    if not isinstance(rl_config, dict):
        raise CheckpointError(f"checkpoint {checkpoint.path}: manifest.json: rl_config: expected an object")
    stored = rl_config.get("ved_config")
    where = f"checkpoint {checkpoint.path}: manifest.json: rl_config.ved_config"
    if stored is not None and not isinstance(stored, dict):
        raise CheckpointError(f"{where}: expected an object, got {stored!r:.60}")
    if stored and stored.get("deadline") is not None:  # a moment of one search, never a setting to keep
        raise CheckpointError(f"{where}: deadline is set ({stored['deadline']!r}); a stored config has none")
    try:
        base = VEDConfig(**stored) if stored else VEDConfig()
    except (TypeError, ValueError) as e:  # an unknown or missing field, or a value out of range or of a wrong type
        raise CheckpointError(f"{where}: {e}") from None
    return replace(
        base,
        num_candidates=num_candidates,
        budget=base.budget if budget is None else budget,
        explore_slots=base.explore_slots if explore_slots is None else explore_slots,
        seed=seed,
    )


def resolve_budget(config: VEDConfig, depth: int) -> int:
    """The per-prompt token budget ``config`` means for SIDs of ``depth`` tokens; SIDs of one token, which
    have no prefixes to search, are a ``ValueError``."""
    if depth < 2:
        raise ValueError(
            f"VED searches over SID prefixes: SIDs of depth {depth} have none; decode with beam search "
            "(vstar eval --decoder beam; vstar rl --no-ved)"
        )
    least = (depth - 1) * max(config.init_beams, config.num_candidates)
    if config.budget is None:
        return max(BUDGET_MULTIPLE * (depth - 1) * config.num_candidates, least)
    if config.budget < least:
        raise ValueError(
            f"budget {config.budget} is below (depth - 1) x max(init_beams, num_candidates) = {least}, "
            "the most the initial tree may need"
        )
    return config.budget


def budget_problem(config: VEDConfig, depth: int, given: int | None) -> str | None:
    """``resolve_budget``'s refusal of ``config`` in words that say where its budget came from: ``given`` (the
    command's ``--budget``), else the checkpoint's stored one (``checkpoint_ved_config``); None when it fits."""
    try:
        resolve_budget(config, depth)
    except ValueError as e:
        if config.budget is None or depth < 2:  # VED's own budget, or SIDs VED cannot search: the budget is no cause
            return str(e)
        source = "--budget" if given is not None else "the checkpoint's VED budget (--budget overrides it)"
        return f"{source} {config.budget} with G = {config.num_candidates}: {e}"
    return None


def covers_the_catalog(trie: SidTrie, budget: int) -> bool:
    """Whether ``budget`` tokens pay for every SID prefix of the catalog (trie nodes of depth 1 .. D-1)."""
    return budget >= trie.num_prefixes


@dataclass
class VEDStats:
    tokens_spent: int  # backbone tokens, prefill excluded, initial tree included
    nodes: int  # tree nodes (prefixes), root included
    max_depth: int  # deepest state reached: the SID depth once any complete SID is known
    iterations: int  # selections, gate-failed ones included
    cap_hit: bool  # the deadline stopped a search that had budget and work left
    budget: int = 0
    init_tokens: int = 0  # spent by the initial tree
    gate_failures: int = 0
    leaves: int = 0  # complete SIDs known (the pool the returned set is chosen from)
    stop_reason: str = ""  # "budget" | "exhausted" (every valid prefix in the tree) | "deadline"


def initial_beam_width(config: VEDConfig, trie: SidTrie) -> int:
    """The width of the anytime fallback's beam search: ``max(num_candidates, init_beams)``, at most #SIDs."""
    return min(max(config.num_candidates, config.init_beams), trie.num_sids)


def initial_beam_stats(config: VEDConfig, trie: SidTrie) -> VEDStats:
    """What the anytime fallback spends: beam search of ``initial_beam_width`` in place of the initial tree,
    reported as a search the deadline stopped before its first iteration (beam search's accounting: the
    last level is never fed to the backbone, and a complete SID is never a node, as in ``VEDStats``)."""
    width = initial_beam_width(config, trie)
    kept = [min(width, n) for n in trie.level_sizes[1:]]  # beams per level
    return VEDStats(
        tokens_spent=sum(kept[:-1]),
        nodes=1 + sum(kept[:-1]),  # the root and the prefixes fed
        max_depth=trie.depth,
        iterations=0,
        cap_hit=True,
        budget=resolve_budget(config, trie.depth),
        init_tokens=sum(kept[:-1]),
        leaves=kept[-1],
        stop_reason="deadline",
    )
