"""SFT's configuration: ``SFTConfig``, the presets' recipes and ``recipe_config``.

Kept apart from ``training.sft.trainer`` so that it imports nothing heavy: ``vstar sft``
builds and checks its configuration from the command line before torch is
imported or any data is read, so a bad option is reported at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

PRECISIONS = ("auto", "fp32", "bf16")

# What ``vstar sft --preset NAME`` trains with unless an option says otherwise. ``small``'s
# recipe was chosen on held-out valid rows of amazon-industrial (docs/sft-experiments.md): the
# 2,000 most recent valid rows are held out to select the epoch and the fusion weight, the
# rest of train + valid is trained on; then the same configuration is refit on all of train
# + valid with the chosen weight (``refit``). A pretrained --base-model gets no preset's
# recipe, only ``BASE_MODEL_RECIPE``.
RECIPES: dict[str, dict[str, Any]] = {
    "tiny": {},
    "small": {
        "epochs": 20,
        "train_splits": ("train", "valid"),
        "holdout": 2000,
        "eval_limit": 2000,
        "crop_prob": 0.3,
        "last_item_prob": 0.2,
        "text_init": True,
        "embed_dropout": 0.25,
        "hidden_dropout": 0.1,
        "ema": 0.999,
        "refit": True,
    },
}


# A pretrained LM is fine-tuned, not trained from scratch: the presets' 2e-3 would wash out what it learnt.
# 3e-4 is MiniOneRec's SFT learning rate (its sft.py default, for Qwen models on data in this format);
# not measured here (no GPU), and --lr overrides it.
BASE_MODEL_RECIPE: dict[str, Any] = {"lr": 3e-4}


@dataclass(frozen=True)
class SFTConfig:
    preset: str = "small"
    base_model: str | None = None  # local pretrained LM folder; overrides preset
    epochs: int = 10
    max_steps: int | None = None  # optimizer steps in all, in place of epochs (the lr schedule spans them)
    batch_size: int = 64
    lr: float = 2e-3  # the presets, trained from scratch (a --base-model: BASE_MODEL_RECIPE's)
    # AdamW's decay on every parameter, norms' gains, biases and embeddings included (Hugging Face's Trainer
    # exempts biases and norms): the README's SFT models were trained so; exempting them is untried here
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    train_splits: tuple[str, ...] = ("train",)
    holdout: int = 500  # rows of valid kept for selection when valid is trained on
    eval_every: int = 0  # steps between validations; 0 = once per epoch
    eval_limit: int = 1000  # validation rows decoded (the first N)
    eval_beams: int = 10
    seed: int = 0
    max_history: int = 10  # history items in each prompt, the most recent (MiniOneRec's 10)
    crop_prob: float = 0.0  # chance a training row's history is cut to a random recent suffix (each step)
    last_item_prob: float = 0.0  # chance a training row's history is cut to its last item alone (each step)
    text_init: bool = False  # initialise SID token embeddings from the items' text embeddings
    embed_dropout: float = 0.0  # dropout on the input embeddings (Qwen2 has attention dropout only)
    item_tokens: bool = False  # follow each history item in the prompt by its whole-SID token
    hidden_dropout: float = 0.0  # residual dropout on every layer's attention and MLP outputs
    precision: str = "auto"  # auto (bf16 autocast on GPUs that support it, else fp32), fp32, or bf16
    ema: float = 0.0  # decay of an exponential moving average of the weights, validated and saved (0: off)
    fusion_weight: float | None = None  # shallow fusion with transition counts; None: chosen on the held-out rows
    refit: bool = False  # after a held-out run, train again on all rows with its fusion weight (training.sft.trainer)

    @property
    def refits(self) -> bool:
        """A held-out run followed by a refit: there are held-out rows to choose on first."""
        return self.refit and self.holdout > 0 and "valid" in self.train_splits

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.batch_size < 1 or self.lr <= 0:
            raise ValueError("batch_size must be >= 1 and lr > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if "test" in self.train_splits:
            raise ValueError("training on the test split is not allowed")
        if self.max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {self.max_history}")
        if not 0 <= self.embed_dropout < 1:
            raise ValueError(f"embed_dropout must be in [0, 1), got {self.embed_dropout}")
        if self.fusion_weight is not None and self.fusion_weight < 0:
            raise ValueError(f"fusion_weight must be >= 0, got {self.fusion_weight}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1) (0: off), got {self.ema}")
        if not 0 <= self.hidden_dropout < 1:
            raise ValueError(f"hidden_dropout must be in [0, 1), got {self.hidden_dropout}")
        if not 0 <= self.crop_prob <= 1:
            raise ValueError(f"crop_prob must be in [0, 1], got {self.crop_prob}")
        if not 0 <= self.last_item_prob <= 1 or self.crop_prob + self.last_item_prob > 1:
            raise ValueError(
                f"last_item_prob must be in [0, 1 - crop_prob], got {self.last_item_prob} (crop_prob {self.crop_prob})"
            )


def recipe_config(preset: str = "small", base_model: str | None = None, **options: Any) -> SFTConfig:
    """The preset's recipe (a base model's: ``BASE_MODEL_RECIPE``), overridden by every option that is not None."""
    if preset not in RECIPES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(RECIPES)}")
    given = {k: v for k, v in options.items() if v is not None}
    recipe = BASE_MODEL_RECIPE if base_model else RECIPES[preset]
    config = SFTConfig(preset=preset, base_model=base_model, **(recipe | given))
    if given.get("refit") and not config.refits:  # the recipe's refit alone gives way to such options
        raise ValueError(
            "--refit trains again on all of train + valid after a run that held valid rows out: it needs valid "
            f"in --train-splits and --holdout above 0, got --train-splits {','.join(config.train_splits)} "
            f"--holdout {config.holdout}"
        )
    return config


def base_model_problem(path: str | Path) -> str | None:
    """What is wrong with ``path`` as ``--base-model`` that can be seen without torch, or None: a vstar checkpoint
    (its ``manifest.json``) loads as a causal LM, but its tokenizer has no words for the text prompt a pretrained LM
    is given (they became ``<unk>``), and its SID tokens may name another catalog's items: it trained, silently."""
    if (Path(path) / "manifest.json").is_file():
        return (
            f"--base-model {path} is a vstar checkpoint, not a pretrained LM: continue its run with --resume at its "
            "--out, or train from it with vstar rl --init"
        )
    return None
