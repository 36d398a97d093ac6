"""SASRec (Kang & McAuley, 2018): a causal self-attention next-item model, as a baseline.

The model is the paper's: item embeddings scaled by sqrt(d) plus learned position
embeddings, dropout, ``blocks`` causal self-attention blocks (attention and a
two-layer ReLU feed-forward, each with a residual and layer norm), a final layer
norm, and scores given by the dot product with the (shared) item embeddings.

Design decisions and deviations from the paper / its reference code:

* Pre-LN blocks with the same norm on queries, keys and values (the reference
  code normalizes the queries only); the feed-forward is two ``Linear`` layers,
  which is what its width-1 convolutions compute.
* Sequences are left-padded to ``max_history`` slots, so a position embedding
  is a distance from the most recent item, and training and scoring see the
  same layout. Padded keys are masked out; a padded query attends to itself
  only, so no row of the attention is empty (no NaN).
* Training sequences are the training rows' ``history + target``. The data sets
  here are sliding windows over each user's timeline, so the paper's loss on
  every position (``loss_on="all"``) counts an early interaction once per later
  row of its user. The default, ``"last"``, puts the loss on each row's target
  only, as SFT does: every interaction counts once. It won on the held-out
  valid rows of amazon-industrial (train+valid, full softmax; selection HR@10 /
  NDCG@10, seeds 0 and 1): last 0.154 / 0.108 and 0.162 / 0.114, all 0.144 /
  0.107 and 0.150 / 0.111. With the sampled BCE loss, whose single negative
  gives little signal per position, "all" wins instead (0.148 / 0.093 against
  0.124 / 0.082, seed 0): run it as ``--loss bce --loss-on all``.
* ``loss="ce"``: full-softmax cross-entropy over the whole catalog, the
  stronger one here (test HR@10 / NDCG@10 0.140 / 0.098 against 0.124 / 0.083
  for the best BCE setting). ``loss="bce"``: the paper's binary cross-entropy with one
  uniformly sampled negative per position, redrawn while it falls in the row.
* Model selection: HR@10 (ties: NDCG@10) of the SID ranking on the selection
  rows after every epoch; the best weights are kept in memory and training
  stops after ``patience`` epochs without improvement. The selection rows never
  include test (see ``training.baselines.run.run_sasrec``).
* Deterministic for a seed on one machine and thread count: the seed fixes the
  initial weights, the dropout stream, the epoch permutations and the sampled
  negatives.
* The model is too small for intra-op parallelism to pay: one thread trains
  about 4x faster than two on a busy 2-core machine (0.43 vs 1.9 ms per row),
  so the command runs in ``num_threads(1)`` unless told otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models.sid_catalog import SidCatalog
from training.data.dataset import Sample

log = logging.getLogger(__name__)

LOSSES = ("ce", "bce")
LOSS_POSITIONS = ("all", "last")


@dataclass(frozen=True)
class SASRecConfig:
    hidden: int = 64  # embedding and model width
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.2
    max_history: int = 10  # input slots; the data sets keep at most 10 history items
    loss: str = "ce"  # "ce": full softmax; "bce": one sampled negative per position
    loss_on: str = "last"  # "last": the row's target only; "all": every position (paper)
    epochs: int = 200  # upper bound; early stopping usually ends sooner
    max_steps: int | None = None
    patience: int = 5  # epochs without a better selection score before stopping
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.loss_on not in LOSS_POSITIONS:
            raise ValueError(f"loss_on must be one of {LOSS_POSITIONS}, got {self.loss_on!r}")
        if min(self.hidden, self.blocks, self.heads, self.max_history, self.epochs, self.patience, self.batch_size) < 1:
            raise ValueError("hidden, blocks, heads, max_history, epochs, patience and batch_size must be >= 1")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("lr must be > 0 and weight_decay >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


class SelfAttentionBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.attn_norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.ffn_norm = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)  # (B, heads, L, d/heads)
        x = x + F.dropout(self.out(h.transpose(1, 2).reshape(b, n, d)), p, self.training)
        return x + self.ffn(self.ffn_norm(x))


class SASRec(nn.Module):
    """Next-item scores over ``num_items`` items; item index 0 is padding, items are 1..num_items."""

    def __init__(self, num_items: int, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        self.num_items = num_items
        self.item_emb = nn.Embedding(num_items + 1, config.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_history, config.hidden)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(config.hidden, config.heads, config.dropout) for _ in range(config.blocks)
        )
        self.final_norm = nn.LayerNorm(config.hidden)
        # Xavier-normal embeddings as the reference code: nn.Embedding's N(0, 1) times sqrt(d) starts the
        # full softmax at logits of several hundred.
        for emb in (self.item_emb, self.pos_emb):
            nn.init.xavier_normal_(emb.weight)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """Hidden state per position of left-padded item indices ``seq`` (B, L) -> (B, L, hidden)."""
        n = seq.shape[1]
        valid = seq > 0  # (B, L)
        positions = torch.arange(n, device=seq.device)
        x = self.item_emb(seq) * math.sqrt(self.config.hidden) + self.pos_emb(positions)
        x = self.emb_dropout(x) * valid.unsqueeze(-1)
        causal = torch.ones(n, n, dtype=torch.bool, device=seq.device).tril()
        allowed = causal & (valid.unsqueeze(1) | torch.eye(n, dtype=torch.bool, device=seq.device))  # (B, L, L)
        allowed = allowed.unsqueeze(1)  # (B, 1, L, L)
        for block in self.blocks:
            x = block(x, allowed) * valid.unsqueeze(-1)
        return self.final_norm(x)

    def item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of every real item: (..., hidden) -> (..., num_items); column j is item index j + 1."""
        return hidden @ self.item_emb.weight[1:].T


class ItemIndex:
    """Catalog item ids <-> the model's contiguous indices 1..N (0 is padding)."""

    def __init__(self, catalog: SidCatalog) -> None:
        self.item_ids = sorted(catalog.items)
        self.index = {item: i + 1 for i, item in enumerate(self.item_ids)}

    def encode(self, items: Sequence[int], width: int) -> list[int]:
        """The last ``width`` items as indices, left-padded with 0 to ``width``."""
        tail = [self.index[i] for i in items[-width:]] if width else []
        return [0] * (width - len(tail)) + tail


def training_tensors(rows: Sequence[Sample], index: ItemIndex, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels), both (rows, width): labels[t] is the item after inputs[t], 0 where padded."""
    seqs = torch.tensor([index.encode([*s.history, s.target], width + 1) for s in rows], dtype=torch.long)
    return seqs[:, :-1], seqs[:, 1:] * (seqs[:, :-1] > 0)


def sequence_loss(
    model: SASRec, inputs: torch.Tensor, labels: torch.Tensor, config: SASRecConfig, generator: torch.Generator
) -> torch.Tensor:
    """Mean next-item loss over the positions chosen by ``config.loss_on``."""
    hidden = model(inputs)  # (B, L, H)
    mask = labels > 0
    if config.loss_on == "last":
        mask = torch.zeros_like(mask)
        mask[:, -1] = labels[:, -1] > 0
    hidden, pos = hidden[mask], labels[mask]  # (P, H), (P,)
    if config.loss == "ce":
        return F.cross_entropy(model.item_logits(hidden), pos - 1)
    neg = sample_negatives(inputs, labels, mask, model.num_items, generator)  # (P,)
    pos_logit = (hidden * model.item_emb(pos)).sum(-1)
    neg_logit = (hidden * model.item_emb(neg)).sum(-1)
    logits = torch.cat([pos_logit, neg_logit])
    targets = torch.cat([torch.ones_like(pos_logit), torch.zeros_like(neg_logit)])
    return 2 * F.binary_cross_entropy_with_logits(logits, targets)  # = the sum of the two means


def sample_negatives(
    inputs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, num_items: int, generator: torch.Generator
) -> torch.Tensor:
    """One uniform item per masked position, redrawn while it is in that row's sequence."""
    seen = torch.cat([inputs, labels[:, -1:]], dim=1)  # (B, L+1): every item of the row
    row = torch.arange(inputs.shape[0]).unsqueeze(1).expand_as(mask)[mask]  # (P,)
    neg = torch.randint(1, num_items + 1, row.shape, generator=generator)
    for _ in range(100):
        clash = (seen[row] == neg.unsqueeze(1)).any(1)
        if not clash.any():
            break
        neg[clash] = torch.randint(1, num_items + 1, (int(clash.sum()),), generator=generator)
    return neg


@torch.no_grad()
def rank_items(
    model: SASRec, rows: Sequence[Sample], index: ItemIndex, top: int, batch_size: int = 512
) -> list[list[int]]:
    """The ``top`` highest-scoring catalog item ids after each row's history, best first."""
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    width = model.config.max_history
    for start in range(0, len(rows), batch_size):
        seq = torch.tensor([index.encode(s.history, width) for s in rows[start : start + batch_size]], dtype=torch.long)
        scores = model.item_logits(model(seq)[:, -1])  # (B, N)
        best = scores.topk(min(top, model.num_items), dim=1).indices + 1
        out += [[index.item_ids[i - 1] for i in r] for r in best.tolist()]
    model.train(was_training)
    return out


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` (None: unchanged) inside the block, restored after."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


Scorer = Callable[[SASRec], tuple[float, float]]


def train_sasrec(
    catalog: SidCatalog,
    train_rows: Sequence[Sample],
    select_score: Scorer,
    config: SASRecConfig,
    progress: bool = True,
) -> tuple[SASRec, dict[str, Any]]:
    """Train on ``train_rows``; return the model whose ``select_score`` (HR@10, NDCG@10) was best, and a summary."""
    train_rows = [s for s in train_rows if s.history]  # an empty history gives no input to predict from
    if not train_rows:
        raise ValueError("no training rows with a history: check --train-splits")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    index = ItemIndex(catalog)
    model = SASRec(len(index.item_ids), config)
    inputs, labels = training_tensors(train_rows, index, config.max_history)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_rows) / config.batch_size)
    total_steps = min(config.max_steps or steps_per_epoch * config.epochs, steps_per_epoch * config.epochs)
    log.info("SASRec config %s; %d training rows, %d steps at most", asdict(config), len(train_rows), total_steps)

    best_score, best_state, best_epoch = (-1.0, -1.0), copy.deepcopy(model.state_dict()), -1
    history: list[dict[str, Any]] = []
    step, start = 0, time.perf_counter()
    bar = tqdm(total=total_steps, desc=f"sasrec-{config.loss}", disable=not progress)
    model.train()
    for epoch in range(config.epochs):
        perm = torch.from_numpy(np.random.default_rng([config.seed, epoch]).permutation(len(train_rows)))
        losses = []
        for batch in perm.split(config.batch_size):
            loss = sequence_loss(model, inputs[batch], labels[batch], config, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
            if step >= total_steps:
                break
        score = select_score(model)
        mean_loss = float(np.mean(losses))
        history.append(
            {"epoch": epoch, "step": step, "loss": round(mean_loss, 4), "HR@10": score[0], "NDCG@10": score[1]}
        )
        log.info("epoch %d: loss %.4f, selection HR@10 %.4f NDCG@10 %.4f", epoch, mean_loss, *score)
        bar.set_postfix(loss=f"{mean_loss:.3f}", hr10=f"{score[0]:.4f}", best=f"{max(score, best_score)[0]:.4f}")
        if score > best_score:
            best_score, best_state, best_epoch = score, copy.deepcopy(model.state_dict()), epoch
        if step >= total_steps or epoch - best_epoch >= config.patience:
            break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    summary = {
        "config": asdict(config),
        "best": {"epoch": best_epoch, "HR@10": best_score[0], "NDCG@10": best_score[1]},
        "steps": step,
        "train_seconds": round(time.perf_counter() - start, 1),
        "history": history,
    }
    return model, summary
