"""What a pretrained model's folder must hold, shared by ``--base-model`` (``models.policy``) and ``vstar embed
--encoder`` (``training.data.item_embed``), which check it the same way. Nothing here imports torch."""

from __future__ import annotations

from pathlib import Path

# The files a saved tokenizer has one of (fast, word-piece, BPE, SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def first_line(error: Exception) -> str:
    """The first line of an error's message (transformers' run to dozens), or its type when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
