"""Item text embeddings for a new catalog: ``vstar embed --data DIR --encoder PATH``.

A catalog arrives with ``item.json`` (titles and descriptions); ``vstar sids``
needs ``item_emb.npy``, one L2-normalised row per item. This module writes it
with a text encoder from a local folder (any Hugging Face ``AutoModel``: a
sentence-transformers checkpoint such as all-MiniLM-L6-v2, a BERT, a Qwen;
nothing is downloaded), and records how in ``item_emb.json`` beside it.
Design decisions:

- The item's text is the recipe of ``../shared/data/amazon-industrial``'s
  embeddings (its ``item_emb.json``): the title, then the description (a
  Python-literal list of paragraphs joined by spaces, HTML tags stripped,
  entities decoded, whitespace collapsed, cut at a word boundary to at most 400
  characters), joined by ". " (by a space when the title already ends a
  sentence), or the title alone. With that data set's encoder (all-MiniLM-L6-v2,
  mean pooling, 256 tokens) this reproduces its ``item_emb.npy``: see the README.
- Pooling and the token limit come from the encoder folder when it says
  (sentence-transformers' ``1_Pooling/config.json`` and
  ``sentence_bert_config.json``), else mean pooling and the tokenizer's own
  limit (at most 512); ``--pooling`` and ``--max-length`` override. ``last``
  (the last real token) is for decoder LMs.
- Batches are padded on the right whatever the tokenizer's own side: with
  absolute positions (BERT) left padding would move every token's position.
- Texts are encoded shortest first, so a batch pads little; pooling reads the
  attention mask, so the order and the batch size do not change a row beyond
  float rounding.
- Rows are always L2-normalised (cosine geometry, as the k-means of ``vstar
  sids`` and the dense reward expect). The encoder runs in fp32. A row that
  is NaN, infinite or zero (broken weights) stops the run with nothing written.
- An existing ``item_emb.npy`` is kept unless ``force``: the ``index.json``
  beside it (and the CSVs' SIDs) was built from it. Both files are written in
  full under temporary names before either is renamed onto its old one, so a
  failed write (a full disk) leaves the old pair. Two files cannot be replaced in
  one step: the record is renamed first and names the new rows' sha256, so a run
  killed between the renames leaves a pair that every reader of the embeddings
  refuses, naming both files (``data_files.check_embedding_record``).
"""

from __future__ import annotations

import ast
import hashlib
import html
import io
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from models.atomic_folder import replacing_files
from models.output_path import parents_problem
from models.pretrained_folder import TOKENIZER_FILES, first_line, has_tokenizer
from training.data.data_files import DataError, embedding_record, parse_item_id, read_json_object

Pooling = Literal["mean", "cls", "last"]
POOLINGS: tuple[Pooling, ...] = ("mean", "cls", "last")
DESCRIPTION_CHARS = 400
MAX_AUTO_LENGTH = 512
TEXT_RULE = (
    "title + '. ' + description (a space instead when the title ends in . ! or ?; Python-literal list joined "
    f"by spaces, HTML stripped, cut at a word boundary to <= {DESCRIPTION_CHARS} chars); title only if no description"
)
# sentence-transformers' 1_Pooling/config.json flag -> our pooling
ST_POOLING: dict[str, Pooling] = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last",
}


TAG = re.compile(r"<[/!]?[A-Za-z][^<>]*>")  # an HTML tag, not "from <5V to >12V"


class EncoderError(ValueError):
    """The encoder folder cannot be loaded or used as a text encoder."""


@dataclass(frozen=True)
class EmbedConfig:
    encoder: Path
    pooling: Pooling | None = None  # None: the encoder folder's, else mean
    max_length: int | None = None  # tokens; None: the encoder folder's, else the tokenizer's (<= 512)
    batch_size: int = 64
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r}: expected one of {', '.join(POOLINGS)}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length {self.max_length}: expected at least 1 token")
        if self.batch_size < 1:
            raise ValueError(f"batch_size {self.batch_size}: expected at least 1")


def _clean(text: str) -> str:
    text = html.unescape(TAG.sub(" ", text))
    return re.sub(r"\s+", " ", text).strip()


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = text[:limit]
    space = head.rfind(" ")
    return (head[:space] if space > 0 else head).rstrip()


def _description(value: Any) -> str:
    if isinstance(value, list):
        parts = value
    elif isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):  # not a literal: plain text
            parsed = value  # (TypeError: "[{[]: 1}]", a dict keyed by a list; the others: the parser's limits)
        parts = parsed if isinstance(parsed, list) else [value]
    else:
        parts = [value] if value else []
    return _cut(_clean(" ".join(str(p) for p in parts)), DESCRIPTION_CHARS)


def item_text(entry: dict[str, Any]) -> str:
    """The text embedded for one ``item.json`` entry (``TEXT_RULE``)."""
    title = _clean(str(entry.get("title") or ""))
    description = _description(entry.get("description") or "")
    if not description:
        return title
    if not title:
        return description
    return f"{title} {description}" if title.endswith((".", "!", "?")) else f"{title}. {description}"


def item_entries(path: Path) -> list[Any]:
    """Row i = the ``item.json`` entry of item id i; ids must be 0..N-1, as the rows of ``item_emb.npy`` (which
    ``vstar embed`` writes and ``vstar sids`` reads) are."""
    meta = read_json_object(path)
    if not meta:
        raise DataError(f"{path}: no items")
    entries: dict[int, Any] = {}
    for key, entry in meta.items():
        item = parse_item_id(key, path, 1)  # decimal digits, as index.json's keys
        if item in entries:
            raise DataError(f"{path}: two keys name item {item} (e.g. '1' and '01'): each item id once")
        entries[item] = entry
    missing = sorted(set(range(len(entries))) - entries.keys())
    if missing:
        raise DataError(
            f"{path}: the {len(entries)} items must have ids 0..{len(entries) - 1} (row i of item_emb.npy = item i); "
            f"{missing[0]} is missing and the largest id is {max(entries)}"
        )
    return [entries[i] for i in range(len(entries))]


def item_texts(path: Path) -> list[str]:
    """Row i = the text of item id i, from ``item.json``; ids must be 0..N-1 and every item must have text."""
    texts = []
    for item, entry in enumerate(item_entries(path)):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: item {item}: expected an object with a title, got {type(entry).__name__}")
        text = item_text(entry)
        if not text:
            raise DataError(f"{path}: item {item} has neither a title nor a description to embed")
        texts.append(text)
    return texts


def _folder_json(folder: Path, name: str) -> dict[str, Any]:
    path = folder / name
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EncoderError(f"{path}: unreadable JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def folder_pooling(folder: Path) -> Pooling | None:
    """The pooling a sentence-transformers folder declares (``1_Pooling/config.json``), if one we support."""
    config = _folder_json(folder, "1_Pooling/config.json")
    chosen = [pooling for flag, pooling in ST_POOLING.items() if config.get(flag)]
    if config and not chosen:
        raise EncoderError(
            f"{folder / '1_Pooling/config.json'}: a pooling other than mean, cls or last token; "
            "choose one with --pooling"
        )
    return chosen[0] if chosen else None


def weights_sha256(folder: Path) -> str | None:
    """sha256 of the encoder's weights (its shards in name order), recorded so that the embeddings name the exact
    model; None when the folder holds neither safetensors nor PyTorch weights."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        return None
    h = hashlib.sha256()
    for path in files:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class TextEncoder:
    """A local Hugging Face encoder with its tokenizer, pooled to one vector per text."""

    def __init__(self, config: EmbedConfig) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        folder = config.encoder
        if not has_tokenizer(folder):
            raise EncoderError(
                f"{folder}: no tokenizer ({', '.join(TOKENIZER_FILES)}); save the tokenizer with the model "
                "(tokenizer.save_pretrained into the same folder)"
            )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        except Exception as e:  # transformers and safetensors raise many kinds; each means "not loadable"
            raise EncoderError(f"{folder}: cannot load a text encoder and its tokenizer ({first_line(e)})") from None
        table = self.model.get_input_embeddings().weight.shape[0]
        if len(self.tokenizer) < table // 2:
            raise EncoderError(
                f"{folder}: the tokenizer has {len(self.tokenizer)} tokens for an embedding table of {table}: "
                "is the model's own tokenizer missing from the folder?"
            )
        if self.tokenizer.pad_token is None:  # decoder LMs ship without one; the mask hides it anyway
            if self.tokenizer.eos_token is None:
                raise EncoderError(f"{folder}: the tokenizer has neither a pad nor an end-of-text token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"  # positions then match the text's own, absolute or rotary
        self.model.to(config.device).eval()
        self.device = config.device
        self.pooling: Pooling = config.pooling or folder_pooling(folder) or "mean"
        st_length = _folder_json(folder, "sentence_bert_config.json").get("max_seq_length")
        tokenizer_length = getattr(self.tokenizer, "model_max_length", MAX_AUTO_LENGTH)
        limit = min(tokenizer_length, getattr(self.model.config, "max_position_embeddings", None) or tokenizer_length)
        self.max_length = int(config.max_length or st_length or min(limit, MAX_AUTO_LENGTH))
        if self.max_length > limit:  # the tokenizer's limit covers models whose positions start past padding
            raise EncoderError(f"--max-length {self.max_length}: {folder} takes at most {limit} tokens")
        self.dim = int(self.model.config.hidden_size)
        try:  # fail here, not after hours of encoding: a checkpoint of another kind loads but cannot encode
            probe = self.encode(["probe"])
        except Exception as e:
            raise EncoderError(f"{folder}: loads, but cannot encode text ({first_line(e)})") from None
        if not np.isfinite(probe).all():  # broken weights: every row would be NaN (embed_items checks each row)
            raise EncoderError(f"{folder}: loads, but encodes text to NaN or infinite values")

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32 rows, L2-normalised."""
        import torch

        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state.float()  # (B, T, dim)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        if self.pooling == "mean":
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        else:  # the last real token (right padding)
            last = batch["attention_mask"].sum(1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy().astype(np.float32)


def embed_texts(encoder: TextEncoder, texts: list[str], batch_size: int, progress: bool = True) -> np.ndarray:
    """Row i = the embedding of texts[i]; encoded shortest first (by characters) in batches of ``batch_size``."""
    from tqdm import tqdm

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.empty((len(texts), encoder.dim), dtype=np.float32)
    with tqdm(total=len(texts), desc="embed", unit="item", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            out[rows] = encoder.encode([texts[i] for i in rows])
            bar.update(len(rows))
    return out


def check_rows(embeddings: np.ndarray, encoder: Path) -> None:
    """An EncoderError naming the items whose row is not a unit vector: NaN or infinite (a model with broken
    weights, or one that overflows) or zero (nothing to normalise). Such rows cannot be clustered by vstar sids,
    and written with ``force`` they would replace good ones."""
    bad = np.flatnonzero(~np.isfinite(embeddings).all(1) | ~embeddings.any(1))
    if bad.size:
        listed = ", ".join(map(str, bad[:5])) + (f" and {bad.size - 5} more" if bad.size > 5 else "")
        raise EncoderError(
            f"{encoder} gave NaN, infinite or zero vectors for {bad.size} of {len(embeddings)} items "
            f"(item {listed}); nothing was written"
        )


def embed_items(data_dir: Path, config: EmbedConfig, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write ``data_dir/item_emb.npy`` (row i = item id i) and ``item_emb.json``; returns the report.
    The data, the old file and whether the folder can take the new ones are checked before torch loads."""
    out = data_dir / "item_emb.npy"
    if out.exists() and not force:
        raise FileExistsError(
            f"{out} exists (an index.json built from it would no longer match); pass --force to replace it, "
            "then rebuild the SIDs and the splits' SID columns: vstar sids --force --update-splits"
        )
    problem = parents_problem(out)
    if problem is not None:  # found now, not after the encoding
        raise ValueError(f"--data: {problem}")
    start = time.perf_counter()
    texts = item_texts(data_dir / "item.json")
    import torch

    encoder = TextEncoder(config)
    embeddings = embed_texts(encoder, texts, config.batch_size, progress)
    check_rows(embeddings, config.encoder)
    seconds = time.perf_counter() - start
    record = {
        "model": str(config.encoder),
        "model_weights_sha256": weights_sha256(config.encoder),
        "dim": encoder.dim,
        "num_items": len(texts),
        "dtype": "float32",
        "l2_normalized": True,
        "row_order": "row i = item id i (keys of item.json)",
        "text": TEXT_RULE,
        "max_seq_length_tokens": encoder.max_length,
        "pooling": encoder.pooling,
        "torch": torch.__version__,
    }
    buffer = io.BytesIO()
    np.save(buffer, embeddings)
    record["npy_sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()  # ties the record to these rows
    with replacing_files([embedding_record(out), out]) as (record_file, rows):  # both written, then the record
        rows.write(buffer.getvalue())  # renamed first (module doc)
        record_file.write((json.dumps(record, indent=2) + "\n").encode())
    return record | {"out": str(out), "seconds": round(seconds, 3)}
