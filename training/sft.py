"""Supervised fine-tuning: next-item SID prediction, loss on the target tokens only.

Design decisions:

* AdamW with linear warm-up then cosine decay; fp32 on CPU, bf16 autocast on
  GPUs that support it.
* Batches are drawn from a seeded permutation per epoch and sorted by length
  inside small chunks (less padding, still shuffled); ``--seed`` fixes both the
  initial weights and the order, so a run is deterministic on one machine.
* Model selection: HR@10 (ties: NDCG@10) by constrained beam search on the
  validation rows, after every epoch (or every ``eval_every`` steps). When the
  valid split is itself trained on (``--train-splits train,valid``), the last
  ``holdout`` rows of valid (the most recent ones) are held out of training and
  used for selection instead; test is never looked at.
* ``--holdout 0`` trains on all of valid and keeps the last model: the refit,
  once the configuration and epoch count were chosen on a held-out run.
  ``--refit`` (on in the small recipe) runs both in one command: the held-out
  run at ``<out>.heldout`` chooses the fusion weight, then the same
  configuration is trained from scratch on all of train + valid with that
  weight. The most recent valid rows are the closest to what is recommended
  next; a model that never saw them loses about 7% HR@10 on test (README).
* Regularisers for this small-data regime, each a forward hook so checkpoints
  are unchanged: dropout on the input embeddings and residual dropout on every
  layer's attention and MLP outputs (Qwen2 has attention dropout only), plus
  history cropping. ``--item-tokens`` adds a whole-SID token per history item
  to the prompt (``models.sid_tokenizer``).
* The configuration (``SFTConfig``, the presets' recipes) lives in
  ``training.sft_config``, which imports nothing heavy, so the CLI checks it
  before torch loads.
* Curves: loss and learning rate every step, the held-out HR@10 / NDCG@10 at
  each validation, as TensorBoard scalars (``training.scalar_log``).
* The best model goes to ``--out``; the latest state (weights, optimizer,
  scheduler, position in the data) to ``<out>.resume`` after each validation,
  so ``--resume`` continues an interrupted run. Both writes are atomic.
* Under ``torchrun`` / ``accelerate launch`` (``training.distributed``): DDP,
  ``--batch-size`` is the global batch (each rank trains on its slice, the loss
  weighted by the rank's share of target tokens, so the gradient is the global
  batch's), validation is sharded over the ranks, rank 0 alone writes, and each
  rank draws its own dropout masks. With the same global batch and no dropout,
  N processes give the parameters of one up to float rounding.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from models.checkpoint import load_checkpoint, save_checkpoint
from models.policy import Policy
from models.sid_tokenizer import item_token
from training.data import RecDataset, Sample, popular_sids
from training.distributed import (
    barrier,
    fork_rng,
    is_main,
    loss_scales,
    require_global_batch,
    shard,
    shard_rows,
    weighted_mean,
    world_size,
    wrap_ddp,
)
from training.evaluate import beam_decoder, evaluate
from training.fusion import fuse_trained
from training.scalar_log import ScalarLog
from training.sft_config import SFTConfig

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best: tuple[float, float] = (-1.0, -1.0)
    history: list[dict[str, Any]] = field(default_factory=list)


def split_for_training(data: RecDataset, config: SFTConfig) -> tuple[list[Sample], list[Sample]]:
    """(training rows, selection rows) following the holdout rule above."""
    train = data.samples([s for s in config.train_splits if s != "valid"])
    valid = list(data.splits["valid"])
    if "valid" in config.train_splits:
        cut = max(len(valid) - config.holdout, 0)
        return train + valid[:cut], valid[cut:]
    return train, valid


def encode_sample(policy: Policy, sample: Sample) -> tuple[list[int], list[int]]:
    cat = policy.catalog
    prompt = policy.prompt.encode(policy.tokenizer, [cat.sid_of(i) for i in sample.history])
    target = policy.tokenizer.convert_tokens_to_ids(list(cat.sid_of(sample.target)))
    return prompt, list(target)


def crop_histories(
    policy: Policy,
    samples: Sequence[Sample],
    index: Sequence[int],
    rows: list[tuple[list[int], list[int]]],
    prob: float,
    seed: tuple[int, int],
    last_item_prob: float = 0.0,
) -> list[tuple[list[int], list[int]]]:
    """Cut some histories to a random recent suffix (``prob``) or to the last item alone (``last_item_prob``):
    more (recent item -> target) contexts per row; the last-item rows teach each observed transition on its
    own, as an item-to-item model counts it."""
    rng = np.random.default_rng(list(seed))
    out = list(rows)
    for j, i in enumerate(index):
        hist = samples[i].history
        if len(hist) < 2:
            continue
        u = rng.random()
        if u < prob + last_item_prob:
            keep = 1 if u >= prob else int(rng.integers(1, len(hist)))
            out[j] = encode_sample(policy, Sample(samples[i].user_id, hist[-keep:], samples[i].target))
    return out


def dropout_hook(p: float) -> Callable[[torch.nn.Module, object, Any], Any]:
    """A forward hook applying dropout to a module's output (the first element of a tuple output)
    while the module trains; hooks leave the checkpoint unchanged."""

    def hook(module: torch.nn.Module, inputs: object, output: Any) -> Any:
        if isinstance(output, tuple):
            return (torch.nn.functional.dropout(output[0], p, module.training), *output[1:])
        return torch.nn.functional.dropout(output, p, module.training)

    return hook


def add_embedding_dropout(policy: Policy, p: float) -> None:
    """Dropout on the token embeddings while training."""
    policy.model.get_input_embeddings().register_forward_hook(dropout_hook(p))


def add_residual_dropout(policy: Policy, p: float) -> None:
    """Dropout on each decoder layer's attention and MLP outputs before they join the residual stream
    (GPT-2 / BERT's residual dropout; Qwen2 has none)."""
    layers = getattr(getattr(policy.model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") and hasattr(layer, "mlp") for layer in layers):
        raise ValueError(f"--hidden-dropout: {type(policy.model).__name__} has no model.layers[i].self_attn / .mlp")
    hook = dropout_hook(p)
    for layer in layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


@torch.no_grad()
def init_sid_embeddings(policy: Policy, item_emb: np.ndarray) -> None:
    """Set each SID token's input embedding to the mean text embedding of its items, projected by PCA.

    Whole-SID item tokens, when the prompt has them, get the mean of their own
    items the same way. The projection keeps the top principal directions of those token means and
    rescales them to the embedding matrix's current std, so training starts with
    semantically close tokens close together instead of random.
    """
    cat, emb = policy.catalog, policy.model.get_input_embeddings().weight
    token_ids, means = [], []
    for level in range(cat.depth):
        for token in cat.tokens_of_level(level):
            items = [i for i, it in cat.items.items() if it.sid[level] == token]
            token_ids.append(policy.tokenizer.convert_tokens_to_ids(token))
            means.append(item_emb[items].mean(axis=0))
    if policy.prompt.item_tokens:
        for sid, items in zip(cat.sids, cat.items_of_sid, strict=True):
            token_ids.append(policy.tokenizer.convert_tokens_to_ids(item_token(sid)))
            means.append(item_emb[items].mean(axis=0))
    x = torch.tensor(np.stack(means), dtype=torch.float32)
    x = x - x.mean(dim=0, keepdim=True)
    u, sv, _ = torch.linalg.svd(x, full_matrices=False)
    dim = min(emb.shape[1], u.shape[1])
    proj = torch.zeros(len(token_ids), emb.shape[1])
    proj[:, :dim] = u[:, :dim] * sv[:dim]
    proj *= emb.std().item() / proj.std()  # the embedding may live on a GPU: a plain float crosses devices
    emb[torch.tensor(token_ids, device=emb.device)] = proj.to(emb.device, emb.dtype)


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 except on the target tokens."""
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, t) in enumerate(rows):
        n = len(p) + len(t)
        ids[i, :n] = torch.tensor(p + t)
        labels[i, len(p) : n] = torch.tensor(t)
        mask[i, :n] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": positions}


def selection_score(
    policy: Policy, select_rows: Sequence[Sample], train_rows: Sequence[Sample], beams: int
) -> tuple[float, float]:
    """(HR@10, NDCG@10) by beam search on the selection rows; sharded and row-weighted over the ranks."""
    part = shard_rows(select_rows)
    m = {"HR@10": 0.0, "NDCG@10": 0.0}
    if part or world_size() == 1:
        m = evaluate(policy, part, train_rows, beam_decoder(beams), progress=False)["metrics"]
    m = weighted_mean({k: m[k] for k in ("HR@10", "NDCG@10")}, len(part))
    return m["HR@10"], m["NDCG@10"]


class WeightAverage:
    """An exponential moving average of a model's weights (``torch.optim.swa_utils``), swapped in on demand.

    ``swapped_in()`` puts the averaged weights into the live model and restores the
    training weights on exit, so selection, decoding and checkpoints see the average
    while the optimizer keeps stepping the raw weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.model = model
        self.average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    def update(self) -> None:
        self.average.update_parameters(self.model)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        live = self.model.state_dict()
        saved = {k: v.detach().clone() for k, v in live.items()}
        with torch.no_grad():
            for k, v in self.average.module.state_dict().items():
                live[k].copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in saved.items():
                    live[k].copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return self.average.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average.load_state_dict(state)


def select_and_save(
    policy: Policy,
    state: TrainState,
    select_rows: Sequence[Sample],
    train_rows: Sequence[Sample],
    eval_beams: int,
    out: Path,
    resume_dir: Path,
    manifest: dict[str, Any],
    trainer_state: Callable[[], dict[str, Any]],
    extras: dict[str, dict[str, torch.Tensor]] | None = None,
    selectable: bool = True,
    averaged: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> None:
    """One validation of SFT or RL: score the selection rows, keep the best model at ``out``
    (when ``selectable``) and the latest state at ``resume_dir``; rank 0 writes, all ranks wait.
    With no selection rows the latest model is kept at ``out``. Inside ``averaged()`` the policy
    holds the weights to score and keep (an EMA); the resume state keeps the training weights."""
    if not select_rows:  # nothing held out (a refit): the latest model is the one to keep
        state.history.append({"step": state.step, "epoch": state.epoch})
        if is_main():
            with averaged():
                save_checkpoint(out, policy, manifest | {"selection": state.history[-1]}, extras)
            save_checkpoint(resume_dir, policy, manifest, extras, trainer_state=trainer_state())
        barrier()
        return
    with averaged():
        score = selection_score(policy, select_rows, train_rows, eval_beams)
        state.history.append({"step": state.step, "epoch": state.epoch, "HR@10": score[0], "NDCG@10": score[1]})
        log.info("step %d: selection HR@10 %.4f NDCG@10 %.4f", state.step, *score)
        if selectable and score > state.best:
            state.best = score
            if is_main():
                save_checkpoint(out, policy, manifest | {"selection": state.history[-1]}, extras)
    if is_main():
        save_checkpoint(resume_dir, policy, manifest, extras, trainer_state=trainer_state())
    barrier()


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    chunk = batch_size * 32
    batches: list[list[int]] = []
    for start in range(0, len(perm), chunk):
        part = sorted(perm[start : start + chunk].tolist(), key=lambda i: lengths[i])
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain fp32)."""
    if precision == "fp32":
        return None
    bf16_ok = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    if precision == "bf16":
        if not bf16_ok:
            raise ValueError(f"precision bf16: {device} does not support bfloat16")
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and bf16_ok else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Treat denormal floats as zero while training on CPU (they are slow there: tiny gradients and Adam
    moments made steps up to ~10x slower in one run here); restored after, being process-wide state."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def train_sft(
    data: RecDataset,
    out: str | Path,
    config: SFTConfig,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
    tensorboard: Path | None = None,
) -> dict[str, Any]:
    """Train, keep the best checkpoint at ``out``; returns a summary. Curves go to ``tensorboard`` if given.

    With ``config.refits`` this is two runs: the held-out run at ``<out>.heldout`` (selection and the
    fusion weight, as without ``refit``), then the same configuration from scratch on all of train +
    valid (``holdout`` 0, that weight, last model kept) at ``out``. ``resume`` continues whichever
    run was interrupted; a finished held-out run (its fusion chosen) is not run again.
    """
    with flush_denormals():
        if not config.refits:
            return _train_sft(data, out, config, device, resume, progress, tensorboard)
        out = Path(out)
        heldout_out = out.parent / f"{out.name}.heldout"
        heldout_curves = tensorboard.with_name(f"{tensorboard.name}-heldout") if tensorboard else None
        chosen = finished_heldout_run(heldout_out) if resume else None
        if chosen is None:
            again = resume and (out.parent / f"{heldout_out.name}.resume").exists()
            chosen = _train_sft(data, heldout_out, config, device, again, progress, heldout_curves)
        else:
            log.info("--resume: the held-out run at %s has finished", heldout_out)
        refit = replace(config, holdout=0, fusion_weight=chosen["fusion"]["weight"])
        log.info("refit on all of train + valid with fusion weight %g", refit.fusion_weight)
        again = resume and (out.parent / f"{out.name}.resume").exists()
        summary = _train_sft(data, out, refit, device, again, progress, tensorboard)
        return summary | {"heldout_run": {"checkpoint": str(heldout_out)} | chosen}


def finished_heldout_run(path: Path) -> dict[str, Any] | None:
    """The selection and fusion choice of a finished held-out run at ``path``; None if it has not finished."""
    if not (path / "manifest.json").is_file():
        return None
    manifest = json.loads((path / "manifest.json").read_text())
    if "fusion" not in manifest:  # the fusion choice is the run's last write
        return None
    return {"best": manifest.get("selection"), "fusion": manifest["fusion"]}


def _train_sft(
    data: RecDataset,
    out: str | Path,
    config: SFTConfig,
    device: str,
    resume: bool,
    progress: bool,
    tensorboard: Path | None,
) -> dict[str, Any]:
    out = Path(out)
    resume_dir = out.parent / f"{out.name}.resume"
    require_global_batch(config.batch_size)
    seed_everything(config.seed)
    train_rows, held_out = split_for_training(data, config)
    if not train_rows:
        raise ValueError("no training rows: check --train-splits")
    select_rows = held_out[: config.eval_limit]

    state = TrainState()
    trainer_state = None
    if resume:
        if not resume_dir.exists():
            raise ValueError(f"--resume: no interrupted run at {resume_dir}")
        loaded = load_checkpoint(resume_dir, device)
        policy, trainer_state = loaded.policy, loaded.trainer_state()
        if trainer_state is None or trainer_state.get("config") != asdict(config):
            raise ValueError(f"--resume: {resume_dir} was written with a different configuration")
    elif config.base_model:
        policy = Policy.from_pretrained_lm(config.base_model, data.catalog, config.max_history, config.item_tokens).to(
            device
        )
    else:
        policy = Policy.from_preset(
            config.preset, data.catalog, config.seed, config.max_history, config.item_tokens
        ).to(device)

    if config.text_init and not resume:
        if data.embeddings is None:
            raise ValueError("--text-init needs item_emb.npy in the data set")
        init_sid_embeddings(policy, data.embeddings)
    if config.embed_dropout > 0:
        add_embedding_dropout(policy, config.embed_dropout)
    if config.hidden_dropout > 0:
        add_residual_dropout(policy, config.hidden_dropout)
    encoded = [encode_sample(policy, s) for s in train_rows]
    lengths = [len(p) + len(t) for p, t in encoded]
    steps_per_epoch = math.ceil(len(encoded) / config.batch_size)
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    model = policy.model
    train_model = wrap_ddp(model)  # DDP when distributed; the same parameters as ``model``
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = cosine_schedule(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    if trainer_state is not None:
        optimizer.load_state_dict(trainer_state["optimizer"])
        scheduler.load_state_dict(trainer_state["scheduler"])
        state = TrainState(**trainer_state["train_state"])
        torch.set_rng_state(trainer_state["torch_rng"])
    ema = WeightAverage(model, config.ema) if config.ema > 0 else None
    if ema is not None and trainer_state is not None:
        ema.load_state_dict(trainer_state["ema"])
    fork_rng(config.seed, state.step)
    curves = ScalarLog(tensorboard, state.step if trainer_state is not None else None)
    amp = autocast_dtype(policy.device, config.precision)
    eval_every = config.eval_every or steps_per_epoch
    manifest = {
        "stage": "sft",
        "sft_config": asdict(config),
        "data": {"name": data.name, "fingerprint": data.fingerprint(), "train_rows": len(train_rows)},
        "popular_sids": popular_sids(data.catalog, train_rows),
    }
    log.info(
        "SFT config %s; %d training rows, %d selection rows, %d steps",
        asdict(config),
        len(encoded),
        len(select_rows),
        total_steps,
    )

    def validate() -> None:
        select_and_save(policy, state, select_rows, train_rows, config.eval_beams, out, resume_dir, manifest, lambda: {
            "config": asdict(config),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "train_state": asdict(state),
            "torch_rng": torch.get_rng_state(),
        } | ({"ema": ema.state_dict()} if ema is not None else {}),
        averaged=ema.swapped_in if ema is not None else nullcontext)  # fmt: skip
        curves.validated(state.step, state.history[-1])

    start = time.perf_counter()
    model.train()
    bar = tqdm(total=total_steps, initial=state.step, desc="sft", disable=not progress or not is_main())
    last_validated = state.step if resume else -1
    while state.step < total_steps:
        batches = epoch_batches(lengths, config.batch_size, config.seed, state.epoch)
        for bi in range(state.batch_in_epoch, len(batches)):
            part = shard(batches[bi])  # this rank's slice of the global batch
            rows = [encoded[i] for i in part.rows]
            if config.crop_prob > 0 or config.last_item_prob > 0:
                rows = crop_histories(
                    policy,
                    train_rows,
                    part.rows,
                    rows,
                    config.crop_prob,
                    (config.seed, state.step),
                    config.last_item_prob,
                )
            batch = {k: v.to(policy.device) for k, v in collate(rows, int(policy.tokenizer.pad_token_id)).items()}
            with torch.autocast(policy.device.type, dtype=amp, enabled=amp is not None):
                loss = train_model(**batch).loss  # mean over this shard's target tokens
            (scale,) = loss_scales([sum(len(t) for _, t in rows) if part.counted else 0])  # 1.0 in one process
            optimizer.zero_grad(set_to_none=True)
            (loss * scale).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]  # this step's
            scheduler.step()
            if ema is not None:
                ema.update()
            state.step += 1
            state.batch_in_epoch = bi + 1
            curves.add(state.step, {"train/loss": loss.item(), "train/lr": lr})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=state.epoch)
            if state.step % eval_every == 0 or state.step >= total_steps:
                validate()
                last_validated = state.step
                model.train()
            if state.step >= total_steps:
                break
        if state.batch_in_epoch >= len(batches):
            state.epoch += 1
            state.batch_in_epoch = 0
    bar.close()
    if last_validated != state.step:
        validate()
    curves.close()
    fusion = None
    if is_main():  # the kept model's fusion with the transition counts (training.fusion)
        fusion = fuse_trained(out, config.fusion_weight, train_rows, held_out, config.eval_limit, str(policy.device))
    barrier()
    return {
        "best": {"HR@10": state.best[0], "NDCG@10": state.best[1]} if select_rows else None,  # None: a refit
        "steps": state.step,
        "seconds": round(time.perf_counter() - start, 1),
        "history": state.history,
        "train_rows": len(train_rows),
        "selection_rows": len(select_rows),
        "fusion": fusion,
    }
