"""Candidate-set diagnostics: what a decoder gives GRPO to learn from.

For each prompt of a split, one decoder (beam search or VED) builds the
candidate set C(x) of G SIDs; the standard reward and the group advantage are
computed as in training. Reported means over prompts:

* ``reachability``: share of prompts whose target SID is in C(x);
* ``nonzero_adv_share``: share of groups with a non-zero advantage. With the
  rule + ranking reward every candidate gets the same reward unless the target
  is in C(x), so for G >= 2 this equals ``reachability`` by construction;
* ``reward_std``: within-group reward std (unbiased, as in the advantage);
* ``distinct_l1``: distinct first-level SID tokens in C(x) (prefix diversity);
* ``tokens_per_prompt``: tokens the decoder fed the backbone, prefill excluded.

``--budget B`` with beam search runs the widest beam whose tokens fit B and keeps
its G best, so beam and VED can be compared at equal cost. Its tokens are
counted as ``tokens_per_prompt`` counts them (``rollout.beam_tokens``): a level
with fewer prefixes than the width costs only its prefixes, so on a catalog with
few first-level codes the width is above B // (depth - 1); it is at most the
catalog's SIDs (``rollout.equal_budget_beam_width``). VED decodes with the
checkpoint's VED settings (``models.ved_config.checkpoint_ved_config``).

The trainer logs the same figures every step (``candidate_stats``).

A checkpoint whose run fused its rollouts (``--fused-rollouts``) is diagnosed
fused as they were (``training.rl.rows.rollout_fusion``): at the run's weight,
with counts of the rows the run counted (never its held-out rows, nor valid's
or test's when it trained on train alone), each diagnosed row the counts hold
decoding with its own transition left out, as in training. Where the checkpoint
no longer tells the weight, or the data is not the run's, the candidate sets
are the policy's alone, and the command says so (a note, and the JSON key
``rollout_fusion_note``).

With a checkpoint that has a value head, the head's quality on the same
candidate sets is added (``VALUE_KEYS``; one forward of prompt + candidate per
candidate, the value at every state s_0..s_D):

* ``value_spearman``: within-prompt Spearman rank correlation of V(s_D), the
  value at the complete SID, with its dense reward r_D (the TD target of
  s_D), averaged over the prompts where both vary; ``value_spearman_l<l>``:
  the same at the prefix of level l < D, V(s_l) against the discounted dense
  return from s_l;
* ``target_rank_value`` / ``target_rank_logprob``: the target's mean rank
  (1 = first) among the candidates by V(s_D) and by path log-prob, over the
  ``value_rows`` prompts whose candidate set holds the target. A head worth
  consulting ranks it higher than the policy does;
* ``dense_return_std``: the within-group std (unbiased) of each candidate's
  discounted dense return from the root, s_0 (the signal V_phi learns from),
  averaged over the prompts. Unlike ``reward_std``, which is non-zero only in
  groups that hold the target, it rewards near misses, so a candidate set that
  spans more prefixes can raise it without reaching further.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from models.checkpoint import LoadedCheckpoint
from models.policy import Policy
from models.value_head import ValueHead
from training.data.dataset import Sample
from training.evaluation.decoders import check_decoder, ved_setup
from training.rl.rewards import GAMMA, batch_standard_rewards, batch_value_rewards, group_advantages
from training.rl.rollout import CandidateSource, Rollout, beam_source, collect, sequences, ved_source
from training.rl.rows import RolloutFusion

DIAGNOSTIC_KEYS = ("reachability", "nonzero_adv_share", "reward_std", "distinct_l1", "tokens_per_prompt")
VALUE_KEYS = ("value_spearman", "target_rank_value", "target_rank_logprob", "value_rows", "dense_return_std")


def candidate_stats(rollout: Rollout, rewards: torch.Tensor, adv: torch.Tensor) -> dict[str, float]:
    """Means over the prompts of one rollout; rewards and adv are (B, G), 0 at invalid slots."""
    valid = rollout.valid.cpu()  # (B, G)
    rows = []
    for b in range(valid.shape[0]):
        keep = valid[b]
        r = rewards[b, keep]
        rows.append(
            (
                float(rollout.target_sid[b] in rollout.candidates(b)),
                float(bool((adv[b, keep].abs() > 0).any())),
                float(r.std()) if r.numel() > 1 else 0.0,
                float(len(set(rollout.candidates(b)))),
                float(len({p[0] for p in rollout.paths(b)})),
                float(rollout.tokens_spent[b]),
                float(r.mean()) if r.numel() else 0.0,
            )
        )
    t = torch.tensor(rows).mean(dim=0).tolist()
    keys = (
        "reachability",
        "nonzero_adv_share",
        "reward_std",
        "distinct",
        "distinct_l1",
        "tokens_per_prompt",
        "reward_mean",
    )
    return dict(zip(keys, t, strict=True))


def diagnose(
    policy: Policy,
    samples: Sequence[Sample],
    source: CandidateSource,
    batch_size: int = 32,
    progress: bool = True,
    value_head: ValueHead | None = None,
    item_emb: np.ndarray | None = None,  # (items, dim): the dense reward of the value keys
    level_weights: Sequence[float] | None = None,  # its w_1..w_D (``checkpoint_level_weights``); None: the default
    gamma: float = GAMMA,  # the discount the value head was trained with (``checkpoint_gamma``)
) -> dict[str, float]:
    """The ``DIAGNOSTIC_KEYS`` of ``source`` over ``samples``, weighted by prompts; with ``value_head`` (and
    ``item_emb``) also the value head's quality on the same candidate sets (``VALUE_KEYS``)."""
    if not samples:
        raise ValueError("no rows to diagnose")
    totals = dict.fromkeys(DIAGNOSTIC_KEYS, 0.0)
    quality = (
        ValueQuality(policy, value_head, item_emb, level_weights, gamma)
        if value_head is not None and item_emb is not None
        else None
    )
    for start in tqdm(range(0, len(samples), batch_size), desc="diagnose", disable=not progress, leave=False):
        chunk = list(samples[start : start + batch_size])
        rollout = collect(policy, chunk, source)
        rewards, _ = batch_standard_rewards(rollout.sid_index, rollout.target_sid)
        stats = candidate_stats(rollout, rewards, group_advantages(rewards, rollout.valid.cpu()))
        for k in DIAGNOSTIC_KEYS:
            totals[k] += stats[k] * len(chunk)
        if quality is not None:
            quality.add(rollout)
    out = {k: v / len(samples) for k, v in totals.items()}
    return out | (quality.summary() if quality is not None else {})


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when either side is constant."""

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for u in np.unique(v):  # ties share their mean rank
            tie = v == u
            r[tie] = r[tie].mean()
        return r

    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


class ValueQuality:
    """Accumulates ``VALUE_KEYS`` over rollouts: V at every state of every candidate vs its dense reward."""

    def __init__(
        self,
        policy: Policy,
        head: ValueHead,
        item_emb: np.ndarray,
        level_weights: Sequence[float] | None = None,
        gamma: float = GAMMA,
    ) -> None:
        from training.rl.rewards import resolve_level_weights, sid_embeddings

        self.policy, self.head, self.item_emb, self.gamma = policy, head, item_emb, gamma
        self.level_weights = resolve_level_weights(level_weights, policy.catalog.depth)
        self.sid_emb = sid_embeddings(policy.catalog.items_of_sid, item_emb)
        self.corr: dict[int, list[float]] = {}
        self.rank_value: list[float] = []
        self.rank_logprob: list[float] = []
        self.return_std: list[float] = []  # per prompt: std of the candidates' dense returns from s_0

    @torch.no_grad()
    def add(self, rollout: Rollout) -> None:
        from training.rl.loss import token_log_probs

        batch = sequences(rollout)
        model = self.policy.model
        was_training = model.training, self.head.training
        model.eval()  # dropout off, as in the rollout (``collect``) and the trainer's forwards
        self.head.eval()
        try:
            logp, hidden = token_log_probs(model, batch, want_hidden=True)  # (N, D), (N, T+D, H)
            assert hidden is not None
            d = batch.depth
            values = self.head(hidden.float(), batch.attention_mask)[:, -(d + 1) :].cpu()  # (N, D+1) V(s_0..s_D)
        finally:
            model.train(was_training[0])
            self.head.train(was_training[1])
        _, rule = batch_standard_rewards(rollout.sid_index, rollout.target_sid)
        r = batch_value_rewards(
            rollout.token_ids, rollout.sid_index, rollout.target_tokens, rollout.target_item, rule, self.sid_emb,
            self.item_emb, self.level_weights,
        )[batch.row.cpu(), batch.col.cpu()]  # (N, D+1)  # fmt: skip
        returns = r.clone()
        for level in range(d - 1, -1, -1):  # discounted return from each state
            returns[:, level] += self.gamma * returns[:, level + 1]
        path_lp = logp.sum(-1).cpu()  # (N,)
        rows = batch.row.cpu()
        for b in range(rollout.sid_index.shape[0]):
            at = torch.nonzero(rows == b).flatten()
            if len(at) > 1:
                self.return_std.append(float(returns[at, 0].std()))
            for level in range(1, d + 1):
                rho = spearman(values[at, level].numpy(), returns[at, level].numpy())
                if rho is not None:
                    self.corr.setdefault(level, []).append(rho)
            hit = [i for i, c in enumerate(batch.col[at].tolist()) if rollout.sid_index[b, c] == rollout.target_sid[b]]
            if hit:
                t = at[hit[0]]
                self.rank_value.append(float((values[at, d] > values[t, d]).sum()) + 1)
                self.rank_logprob.append(float((path_lp[at] > path_lp[t]).sum()) + 1)

    def summary(self) -> dict[str, float]:
        def mean(v: list[float]) -> float:
            return float(np.mean(v)) if v else float("nan")

        depth = self.policy.trie.depth
        out = {
            "value_spearman": mean(self.corr.get(depth, [])),
            "target_rank_value": mean(self.rank_value),
            "target_rank_logprob": mean(self.rank_logprob),
            "value_rows": float(len(self.rank_value)),
            "dense_return_std": mean(self.return_std),
        }
        return out | {f"value_spearman_l{lv}": mean(self.corr.get(lv, [])) for lv in range(1, depth)}


def candidate_source(
    checkpoint: LoadedCheckpoint,
    decoder: str,
    num_candidates: int,
    budget: int | None,
    seed: int = 0,
    explore_slots: int | None = None,
    fusion: RolloutFusion | None = None,
) -> CandidateSource:
    """The candidate source named on the command line: ``beam``, or ``ved`` with the checkpoint's value head
    and VED settings, its exploratory slots included (``budget`` and ``explore_slots`` override them);
    ``fusion``: fused as the checkpoint's run fused its rollouts (``training.rl.rows.rollout_fusion``)."""
    check_decoder(decoder)
    shallow, counted = (fusion.fusion, fusion.counted) if fusion is not None else (None, None)
    if decoder == "beam":
        return beam_source(num_candidates, budget, shallow, counted)
    return ved_source(*ved_setup(checkpoint, num_candidates, budget, seed, explore_slots), shallow, counted)


def checkpoint_gamma(checkpoint: LoadedCheckpoint) -> float:
    """The discount the checkpoint's RL run trained its value head with (``RLConfig.gamma``); the default when
    it stored none (an SFT checkpoint)."""
    stored = (checkpoint.manifest.get("rl_config") or {}).get("gamma")
    return GAMMA if stored is None else float(stored)


def checkpoint_level_weights(checkpoint: LoadedCheckpoint) -> tuple[float, ...]:
    """The dense reward's level weights the checkpoint's RL run trained its value head with; the default for
    its SIDs' depth when it stored none (an SFT checkpoint, or a run with --no-dense)."""
    from training.rl.rewards import resolve_level_weights

    stored = (checkpoint.manifest.get("rl_config") or {}).get("level_weights")
    return resolve_level_weights(stored, checkpoint.policy.catalog.depth)
