"""Rewards, advantages and TD targets of the RL stage, as pure functions.

Nothing here touches a model: inputs are candidate sets (SID indices or token
paths in rank order), rewards and values; outputs are lists, arrays or tensors.
The trainer (``training.rl.trainer``) calls these per group, so each formula is pinned
by hand-computed unit tests and hypothesis properties.

Standard reward (MiniOneRec): ``rule`` (exact match, 1 or 0) plus ``ranking``.
The ranking reward is non-zero only when the target is among the candidates;
the wrong candidate at beam rank i (0-based) then gets -1/log2(i+2), scaled so
the wrong candidates' penalties sum to exactly -1. (MiniOneRec's code divides by
the sum over all G ranks, the target's rank included, so its penalties sum to a
little more than -1; the issue and this code normalise over the wrong ones.)

Dense semantic reward (V-STAR part A), used only as TD targets for the value
head: at level l and for each prefix present in the candidate set, the bucket is
the candidates sharing that prefix; r_l = w_l if the prefix is the target's
prefix, else -w_l * (1 - cos(mean embedding of the bucket, target embedding)).
w = (0.3, 0.5, 1.0), the paper's, for SIDs of three tokens; the paper gives no
weights for other depths, so a catalog of D tokens per SID defaults to the same
shape, 1 / (D - l + 1) (``default_level_weights``; ``vstar rl --level-weights``
overrides). A SID that several items share is embedded as the mean of its items'
embeddings (``sid_embeddings``); the bucket mean is then the mean over the
bucket's candidate SIDs, and the target is embedded by its own item's row.

Normalisation: group and sibling advantages are (x - mean) / (std + 1e-4) with
the unbiased std, as TRL's GRPO (which MiniOneRec trains with) computes it; a
group or sibling set with fewer than two members gets advantage 0. A sibling
set is centred on its own mean and scaled by its own std or, the trainer's
default, by the std of the whole group (``SIBLING_NORMS``; why: the trainer's
module doc).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

ADV_EPS = 1e-4
# How a sibling set's centred child rewards are scaled: by the set's own std (the method as written) or by the
# std of the whole group's rewards, so that children whose rewards differ by little get small advantages
SIBLING_NORMS = ("siblings", "group")
LEVEL_WEIGHTS = (0.3, 0.5, 1.0)  # the paper's w_1..w_3, for SIDs of three tokens
GAMMA = 0.99


def default_level_weights(depth: int) -> tuple[float, ...]:
    """The dense reward's w_1..w_D: the paper's ``LEVEL_WEIGHTS`` for SIDs of three tokens; for any other
    depth the same shape, 1 / (D - l + 1) at level l (the last level 1, the one before 1/2, then 1/3, ...,
    so four tokens give 1/4, 1/3, 1/2, 1)."""
    if depth < 1:
        raise ValueError(f"SIDs need at least one token, got depth {depth}")
    if depth == len(LEVEL_WEIGHTS):
        return LEVEL_WEIGHTS
    return tuple(1.0 / (depth - level) for level in range(depth))


def resolve_level_weights(weights: Sequence[float] | None, depth: int) -> tuple[float, ...]:
    """``weights`` checked against the catalog's SID depth, or the default for that depth when None."""
    if weights is None:
        return default_level_weights(depth)
    if len(weights) != depth:
        raise ValueError(
            f"{len(weights)} dense-reward level weights ({', '.join(f'{w:g}' for w in weights)}) for SIDs of "
            f"{depth} tokens: give one weight per level (--level-weights), or none for the default"
        )
    return tuple(float(w) for w in weights)


def rule_reward(candidates: Sequence[int], target: int) -> list[float]:
    """1 for the candidate equal to the target SID, 0 for the others."""
    return [1.0 if c == target else 0.0 for c in candidates]


def ranking_reward(candidates: Sequence[int], target: int) -> list[float]:
    """MiniOneRec's ranking penalty for the wrong candidates, given in rank order."""
    if target not in candidates:
        return [0.0] * len(candidates)
    raw = [0.0 if c == target else 1.0 / math.log2(i + 2) for i, c in enumerate(candidates)]
    total = sum(raw)
    return [-r / total if total > 0 else 0.0 for r in raw]


def standard_reward(candidates: Sequence[int], target: int) -> list[float]:
    """Rule plus ranking reward: the reward of the policy loss, for GRPO and V-STAR alike."""
    return [a + b for a, b in zip(rule_reward(candidates, target), ranking_reward(candidates, target), strict=True)]


def sid_embeddings(items_of_sid: Sequence[Sequence[int]], item_emb: np.ndarray) -> np.ndarray:
    """(S, dim) embedding per SID: the mean of its items' rows of ``item_emb`` (items, dim)."""
    out = np.zeros((len(items_of_sid), item_emb.shape[1]), dtype=np.float32)
    for s, items in enumerate(items_of_sid):
        assert items, f"SID {s} has no items"
        out[s] = item_emb[list(items)].mean(axis=0)
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (0 if either is zero)."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0


def dense_reward(
    paths: Sequence[Sequence[int]],
    target_path: Sequence[int],
    path_emb: np.ndarray,  # (G, dim) embedding of each candidate SID
    target_emb: np.ndarray,  # (dim,) embedding of the target item
    weights: Sequence[float] = LEVEL_WEIGHTS,
) -> np.ndarray:
    """(G, depth) reward of each candidate's prefix at each level, computed per prefix bucket."""
    g = len(paths)
    depth = len(target_path)
    if len(weights) != depth:
        raise ValueError(f"{len(weights)} level weights for SIDs of depth {depth}")
    out = np.zeros((g, depth), dtype=np.float32)
    for level in range(depth):
        buckets: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, p in enumerate(paths):
            buckets[tuple(p[: level + 1])].append(i)
        w = weights[level]
        for prefix, members in buckets.items():
            if prefix == tuple(target_path[: level + 1]):
                value = w
            else:
                value = -w * (1.0 - cosine(path_emb[members].mean(axis=0), target_emb))
            out[members, level] = value
    return out


def terminal_reward(rule: Sequence[float], depth: int) -> np.ndarray:
    """(G, depth) sparse rewards for ``--no-dense``: 0 on every level but the last, which gets ``rule``."""
    out = np.zeros((len(rule), depth), dtype=np.float32)
    out[:, -1] = rule
    return out


def normalise(values: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """(x - mean) / (std + 1e-4) over a 1-D tensor, or / (``scale`` + 1e-4) when given; zeros when it has
    fewer than two entries or all are equal (float rounding of their mean would otherwise leave a residue
    that the 1e-4 floor blows up)."""
    if values.numel() < 2 or bool(torch.all(values == values[0])):
        return torch.zeros_like(values)
    return (values - values.mean()) / ((values.std() if scale is None else scale) + ADV_EPS)


def group_advantages(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """GRPO advantages within each group (row), over its valid candidates only.

    rewards: (B, G); valid: (B, G) bool. Returns (B, G), 0 at invalid slots.
    """
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        adv[b, valid[b]] = normalise(rewards[b, valid[b]])
    return adv


def sibling_advantages(
    paths: Sequence[Sequence[int]], rewards: Sequence[float], scale: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sibling-GRPO advantages (part D) of one candidate set.

    For each level l and each parent prefix h with at least two distinct children
    among ``paths``, child v's reward is the mean reward of the candidates routed
    through h+v, normalised within the sibling set: centred on the set's mean and
    divided by the set's own std + 1e-4, or by ``scale`` + 1e-4 when given (the
    group's reward std: ``SIBLING_NORMS``). Returns (advantage, weight),
    both (G, depth): candidate g's token at level l carries its child's advantage
    with weight 1/n(h+v), so that summed over candidates each child token counts
    once. Tokens whose parent has a single child in the set get weight 0.
    """
    g = len(paths)
    depth = len(paths[0]) if g else 0
    adv = np.zeros((g, depth), dtype=np.float32)
    weight = np.zeros((g, depth), dtype=np.float32)
    for level in range(depth):
        routed: dict[tuple[int, ...], dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for i, p in enumerate(paths):
            routed[tuple(p[:level])][int(p[level])].append(i)
        for children in routed.values():
            if len(children) < 2:
                continue
            members = list(children.values())
            # float64: children with equal rewards must tie exactly (float32 rounding of their means made
            # 1-ulp differences that the normalisation turned into advantages of about 1e-3)
            child_reward = torch.tensor([float(np.mean([rewards[i] for i in m])) for m in members], dtype=torch.float64)
            child_adv = normalise(child_reward, scale).tolist()
            for m, a in zip(members, child_adv, strict=True):
                adv[m, level] = a
                weight[m, level] = 1.0 / len(m)
    return adv, weight


def td_targets(rewards: torch.Tensor, values: torch.Tensor, gamma: float = GAMMA) -> torch.Tensor:
    """TD(0) targets r_l + gamma * V(s_{l+1}) along each path, terminal value 0, detached.

    rewards, values: (N, L) for the states s_0..s_{L-1} of each path. Returns (N, L).
    """
    nxt = torch.cat([values[:, 1:], values.new_zeros(values.shape[0], 1)], dim=1)  # (N, L)
    return (rewards + gamma * nxt).detach()


# Batch forms: a step's candidate sets as tensors, invalid slots (SID index -1) skipped.


def batch_standard_rewards(sid_index: torch.Tensor, target_sid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(standard, rule) rewards, each (B, G), 0 at invalid slots; sid_index (B, G) in rank order."""
    sid_index = sid_index.cpu()
    standard, rule = torch.zeros(sid_index.shape), torch.zeros(sid_index.shape)
    for b, target in enumerate(target_sid):
        keep = sid_index[b] >= 0
        cands = sid_index[b, keep].tolist()
        standard[b, keep] = torch.tensor(standard_reward(cands, target))
        rule[b, keep] = torch.tensor(rule_reward(cands, target))
    return standard, rule


def batch_sibling_advantages(
    token_ids: torch.Tensor, valid: torch.Tensor, rewards: torch.Tensor, norm: str = "siblings"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sibling advantages and child weights, each (B, G, D); token_ids (B, G, D), valid and rewards (B, G);
    ``norm`` one of ``SIBLING_NORMS``."""
    if norm not in SIBLING_NORMS:
        raise ValueError(f"sibling norm must be one of {SIBLING_NORMS}, got {norm!r}")
    token_ids, valid = token_ids.cpu(), valid.cpu()
    adv, weight = torch.zeros(token_ids.shape), torch.zeros(token_ids.shape)
    for b in range(token_ids.shape[0]):
        keep = valid[b]
        if not keep.any():  # a prompt without candidates (every score non-finite) has no sibling sets
            continue
        # a group of one has no sibling sets, so it needs no scale
        scale = float(rewards[b, keep].double().std()) if norm == "group" and keep.sum() >= 2 else None
        a, w = sibling_advantages(token_ids[b, keep].tolist(), rewards[b, keep].tolist(), scale)
        adv[b, keep], weight[b, keep] = torch.from_numpy(a), torch.from_numpy(w)
    return adv, weight


def batch_value_rewards(
    token_ids: torch.Tensor,  # (B, G, D) candidate paths
    sid_index: torch.Tensor,  # (B, G) -1 at invalid slots
    target_tokens: torch.Tensor,  # (B, D)
    target_item: Sequence[int],  # (B,)
    rule: torch.Tensor,  # (B, G) exact-match reward
    sid_emb: np.ndarray | None,  # (S, dim); None for the sparse variant
    item_emb: np.ndarray | None,  # (items, dim)
    weights: Sequence[float] = LEVEL_WEIGHTS,
) -> torch.Tensor:
    """(B, G, D+1) TD rewards of the states s_0..s_D of each path: r_0 = 0, then dense
    rewards, or the terminal exact match when no embeddings are given."""
    token_ids, sid_index = token_ids.cpu(), sid_index.cpu()
    b, g, d = token_ids.shape
    out = torch.zeros(b, g, d + 1)
    for i in range(b):
        keep = sid_index[i] >= 0
        if sid_emb is None:
            r = terminal_reward(rule[i, keep].tolist(), d)
        else:
            assert item_emb is not None
            r = dense_reward(
                token_ids[i, keep].tolist(),
                target_tokens[i].tolist(),
                sid_emb[sid_index[i, keep].numpy()],
                item_emb[target_item[i]],
                weights,
            )
        out[i, keep, 1:] = torch.from_numpy(r)
    return out
