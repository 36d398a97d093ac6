"""SFT and eval on the tiny data set: a step trains, selection keeps the best, resume continues, CLI contract."""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import training.sft.trainer as sft_module
from models.checkpoint import load_checkpoint
from models.policy import Policy
from tests.conftest import next_second
from training.data.dataset import Sample, load_dataset, split_for_training
from training.optim import autocast_dtype, restore_rng_state, rng_state
from training.sft.batches import collate, crop_histories, encode_sample
from training.sft.config import SFTConfig
from training.sft.regularisers import add_embedding_dropout, init_sid_embeddings
from training.sft.trainer import train_sft
from vstar import app


def test_collate_masks_everything_but_the_target(tiny_dataset) -> None:
    policy = Policy.from_preset("tiny", tiny_dataset.catalog)
    rows = [encode_sample(policy, s) for s in tiny_dataset.splits["train"][:4]]
    batch = collate(rows, 0)
    for i, (prompt, target) in enumerate(rows):
        labelled = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert labelled == target and len(target) == 3
        assert batch["attention_mask"][i].sum() == len(prompt) + 3
        assert batch["position_ids"][i, : len(prompt) + 3].tolist() == list(range(len(prompt) + 3))


def test_holdout_rule(tiny_dataset) -> None:
    train, select = split_for_training(tiny_dataset, SFTConfig(train_splits=("train", "valid"), holdout=10))
    assert len(train) == 200 + 30 and select == tiny_dataset.splits["valid"][30:]
    train, select = split_for_training(tiny_dataset, SFTConfig(train_splits=("train",)))
    assert len(train) == 200 and select == tiny_dataset.splits["valid"]
    with pytest.raises(ValueError, match="test split"):
        SFTConfig(train_splits=("train", "test"))


def test_training_changes_weights_and_is_deterministic(tiny_dataset, tmp_path: Path) -> None:
    config = SFTConfig(preset="tiny", max_steps=4, batch_size=16, lr=1e-2, eval_limit=16, seed=3)
    init = Policy.from_preset("tiny", tiny_dataset.catalog, seed=3).model.state_dict()
    summary = train_sft(tiny_dataset, tmp_path / "a", config, progress=False)
    assert summary["steps"] == 4 and summary["history"]
    # the summary times an epoch (200 rows, 13 steps of 16), measured over the 4 steps run
    assert summary["steps_per_epoch"] == 13 and summary["seconds_per_epoch"] > 0
    trained = load_checkpoint(tmp_path / "a").policy.model.state_dict()
    assert any(not torch.equal(init[k], trained[k]) for k in init)
    train_sft(tiny_dataset, tmp_path / "b", config, progress=False)
    again = load_checkpoint(tmp_path / "b").policy.model.state_dict()
    assert all(torch.equal(trained[k], again[k]) for k in trained)


AGAIN = r"start again with a lower --lr than 1e\+30 and --force \(--resume would go on at the lr that diverged\)"


@pytest.mark.parametrize(
    ("holdout", "eval_every", "what"),
    [
        (16, 0, r"train/loss nan"),  # the loss of a step after the one that overflowed
        (16, 1, r"the model scored fewer than 10 SIDs as finite for each of 16 selection rows"),  # its validation
        (0, 1, r"the model scored no SID as finite for 4 training rows"),  # a refit's validation, which scores nothing
    ],
)
def test_a_diverged_run_stops_with_its_step_and_what_to_do_and_writes_no_checkpoint(
    tiny_dataset, tmp_path: Path, holdout: int, eval_every: int, what: str
) -> None:
    config = SFTConfig(
        preset="tiny", max_steps=6, batch_size=16, lr=1e30, eval_limit=16, seed=3, holdout=holdout,
        eval_every=eval_every, train_splits=("train", "valid") if holdout == 0 else ("train",),
    )  # fmt: skip
    with pytest.raises(ValueError, match=rf"^training diverged at step \d+ \({what}\): {AGAIN}$"):
        train_sft(tiny_dataset, tmp_path / "a", config, progress=False)
    assert not (tmp_path / "a").exists()


def test_selection_keeps_the_best_validation_not_the_last(
    tiny_dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validated after each of two steps, the first scoring higher: the kept model is step 1's, the resume
    state step 2's."""
    import training.loop as loop_module
    from training.loop import resume_folder

    scores = iter([(0.3, 0.2), (0.1, 0.1)])
    monkeypatch.setattr(loop_module, "selection_score", lambda *args: next(scores, (0.0, 0.0)))
    config = SFTConfig(preset="tiny", max_steps=2, eval_every=1, batch_size=16, lr=1e-2, eval_limit=4, seed=3)
    summary = train_sft(tiny_dataset, tmp_path / "a", config, progress=False)
    assert summary["best"] == {"HR@10": 0.3, "NDCG@10": 0.2}
    kept = load_checkpoint(tmp_path / "a")
    assert kept.manifest["selection"]["step"] == 1
    latest = load_checkpoint(resume_folder(tmp_path / "a")).policy.model.state_dict()
    assert any(not torch.equal(v, latest[k]) for k, v in kept.policy.model.state_dict().items())


def interrupt_at_step(n: int, monkeypatch: pytest.MonkeyPatch, run: Callable[[], object]) -> None:
    """Run ``run`` with the optimizer's ``n``-th step raising KeyboardInterrupt (a crash mid-training)."""
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def crashing(self: torch.optim.AdamW, *args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", crashing)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)


def test_a_resume_state_keeps_the_gpus_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU dropout draws from the device's generator: a resume state that kept only the CPU's restarted
    the masks from the seed's (``seed_everything``) instead of continuing them. The CPU's state is unchanged."""
    gpu_state = torch.tensor([1, 2, 3], dtype=torch.uint8)
    got: list[object] = []
    put: list[tuple[torch.Tensor, object]] = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": got.append(device) or gpu_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": put.append((state, device)))
    assert set(rng_state(torch.device("cpu"))) == {"torch_rng"}
    kept = rng_state(torch.device("cuda:1"))
    assert set(kept) == {"torch_rng", "cuda_rng"} and kept["cuda_rng"] is gpu_state
    assert got == [torch.device("cuda:1")]  # the policy's device, not the current one
    torch.rand(3)  # the CPU's generator moves on; the restore puts it back
    restore_rng_state(kept, torch.device("cuda:1"))
    assert torch.equal(torch.get_rng_state(), kept["torch_rng"]) and put == [(gpu_state, torch.device("cuda:1"))]
    restore_rng_state({"torch_rng": kept["torch_rng"]}, torch.device("cuda:1"))  # a state written before: CPU's
    restore_rng_state(kept, torch.device("cpu"))
    assert len(put) == 1


def test_a_run_resumed_mid_epoch_is_the_uninterrupted_run_bit_for_bit(
    tiny_dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every draw a step makes (crops, both dropouts) and every state it carries (optimizer moments, schedule,
    EMA, RNG, position in the epoch) continues across a resume: interrupted in epoch 0 and resumed from its
    step 6 (batch 6 of 7), the run ends with the same bits as the one never interrupted."""
    config = SFTConfig(
        preset="tiny", epochs=2, batch_size=30, eval_every=3, eval_limit=8, seed=1, crop_prob=0.3,
        last_item_prob=0.2, embed_dropout=0.1, hidden_dropout=0.1, ema=0.9,
    )  # fmt: skip
    train_sft(tiny_dataset, tmp_path / "full", config, progress=False)
    interrupt_at_step(8, monkeypatch, lambda: train_sft(tiny_dataset, tmp_path / "part", config, progress=False))
    stopped = load_checkpoint(tmp_path / "part.resume").trainer_state()["train_state"]
    assert (stopped["step"], stopped["epoch"], stopped["batch_in_epoch"]) == (6, 0, 6)
    train_sft(tiny_dataset, tmp_path / "part", config, resume=True, progress=False)
    for name in ("full", "full.resume"):  # the kept (EMA) model and the training weights
        a = load_checkpoint(tmp_path / name).policy.model.state_dict()
        b = load_checkpoint(tmp_path / name.replace("full", "part")).policy.model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    a, b = (load_checkpoint(tmp_path / f"{run}.resume").trainer_state() for run in ("full", "part"))
    assert a["train_state"] == b["train_state"] and a["scheduler"] == b["scheduler"]
    assert torch.equal(a["torch_rng"], b["torch_rng"])
    moments, resumed = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(moments[p][k], resumed[p][k]) for p in moments for k in moments[p])
    assert all(torch.equal(v, b["ema"][k]) for k, v in a["ema"].items())


def test_resume_continues_to_the_same_weights(tiny_dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = SFTConfig(preset="tiny", epochs=2, batch_size=50, eval_limit=8, seed=1)  # 4 steps per epoch
    train_sft(tiny_dataset, tmp_path / "full", config, progress=False)

    interrupt_at_step(6, monkeypatch, lambda: train_sft(tiny_dataset, tmp_path / "part", config, progress=False))
    assert load_checkpoint(tmp_path / "part.resume").trainer_state()["train_state"]["step"] == 4
    summary = train_sft(tiny_dataset, tmp_path / "part", config, resume=True, progress=False)
    assert summary["steps"] == 8
    a = load_checkpoint(tmp_path / "full.resume").policy.model.state_dict()
    b = load_checkpoint(tmp_path / "part.resume").policy.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(ValueError, match="different configuration"):
        train_sft(
            tiny_dataset, tmp_path / "part", SFTConfig(**{**config.__dict__, "lr": 0.5}), resume=True, progress=False
        )
    with pytest.raises(ValueError, match="no interrupted run"):
        train_sft(tiny_dataset, tmp_path / "never", config, resume=True, progress=False)
    refits = SFTConfig(**{**config.__dict__, "train_splits": ("train", "valid"), "holdout": 10, "refit": True})
    with pytest.raises(ValueError, match="no interrupted run"):  # with --refit it used to start afresh
        train_sft(tiny_dataset, tmp_path / "never", refits, resume=True, progress=False)
    assert not list(tmp_path.glob("never*"))
    other = tmp_path / "other_data"  # the same rows but one more line in test.csv: another data set
    other.mkdir()
    for f in tiny_dataset.files.values():
        (other / f.name).write_bytes(f.read_bytes())
    with (other / "test.csv").open("a") as f:
        f.write((other / "test.csv").read_text().splitlines()[-1] + "\n")
    with pytest.raises(ValueError, match="trained on other data"):
        train_sft(load_dataset(other), tmp_path / "part", config, resume=True, progress=False)
    (tmp_path / "part.resume" / "trainer_state.pt").unlink()
    with pytest.raises(ValueError, match="holds no trainer state"):
        train_sft(tiny_dataset, tmp_path / "part", config, resume=True, progress=False)


def test_cli_sft_then_eval_writes_contract_json(tiny_data_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    ck = tmp_path / "ck"
    res = runner.invoke(
        app,
        [
            "sft",
            "--data",
            str(tiny_data_dir),
            "--out",
            str(ck),
            "--preset",
            "tiny",
            "--max-steps",
            "3",
        ],
    )
    assert res.exit_code == 0, res.output
    out = tmp_path / "eval.json"
    res = runner.invoke(
        app,
        [
            "eval",
            "--data",
            str(tiny_data_dir),
            "--checkpoint",
            str(ck),
            "--split",
            "test",
            "--beams",
            "20",
            "--json",
            str(out),
            "--limit",
            "10",
        ],
    )
    assert res.exit_code == 0, res.output
    payload = json.loads(out.read_text())
    assert payload["rows"] == 10 and payload["seconds"] >= 0
    for k in (1, 3, 5, 10, 20):
        assert 0 <= payload["metrics"][f"HR@{k}"] <= 1 and f"NDCG@{k}" in payload["metrics"]
    assert payload["metrics"]["HR@50"] is None and payload["metrics"]["NDCG@50"] is None  # 20 beams: not measured
    assert payload["metrics"]["HR@10"] >= payload["metrics"]["NDCG@10"]
    assert "coverage@10" in payload["metrics"] and "tail_share@10" in payload["metrics"]


def test_cli_errors_are_clear(tiny_data_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["sft", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "--data" in res.output
    res = runner.invoke(
        app, ["sft", "--data", str(tiny_data_dir), "--out", str(tmp_path / "x"), "--preset", "huge", "--max-steps", "1"]
    )
    assert res.exit_code == 2 and "'huge' is not one of 'tiny', 'small'" in res.output and "Traceback" not in res.output


def test_small_preset_brings_its_recipe_and_options_override_it() -> None:
    from training.sft.config import RECIPES, recipe_config

    config = recipe_config("small")
    assert config.epochs == 20 and config.train_splits == ("train", "valid") and config.holdout == 2000
    assert config.ema == 0.999 and config.text_init and config.fusion_weight is None
    assert recipe_config("small", epochs=3, text_init=False).epochs == 3
    assert not recipe_config("small", text_init=False).text_init
    assert recipe_config("tiny") == SFTConfig(preset="tiny") and RECIPES["tiny"] == {}
    base = recipe_config("small", base_model="/m")  # a pretrained LM gets no preset's recipe, a fine-tuning lr
    assert base.ema == 0.0 and base.epochs == 10 and base.lr == 3e-4
    assert recipe_config("small", base_model="/m", lr=1e-5).lr == 1e-5


def test_preset_with_base_model_is_refused(tmp_path: Path) -> None:
    """--preset builds the model that --base-model replaces: both given is one line, before any work."""
    model = tmp_path / "lm"
    model.mkdir()
    (model / "config.json").write_text("{}")
    args = ["sft", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--base-model", str(model)]
    result = CliRunner().invoke(app, [*args, "--preset", "small"])
    assert result.exit_code == 2 and "--preset builds a model from a config, which --base-model replaces" in (
        result.output
    )
    assert not (tmp_path / "out").exists()


def test_an_explicit_refit_that_would_not_run_is_refused() -> None:
    from training.sft.config import recipe_config

    assert not recipe_config("small", train_splits=("train",)).refits  # the recipe's refit gives way silently
    assert recipe_config("tiny", refit=True, train_splits=("train", "valid")).refits
    for options in ({"train_splits": ("train",)}, {"train_splits": ("train", "valid"), "holdout": 0}):
        with pytest.raises(ValueError, match="--refit trains again on all of train"):
            recipe_config("small", refit=True, **options)
    with pytest.raises(ValueError, match="got --train-splits train --holdout 500"):
        recipe_config("tiny", refit=True)


def test_crop_keeps_target_and_a_recent_suffix(tiny_dataset) -> None:
    policy = Policy.from_preset("tiny", tiny_dataset.catalog)
    samples = [s for s in tiny_dataset.splits["train"] if len(s.history) > 3][:20]
    rows = [encode_sample(policy, s) for s in samples]
    cropped = crop_histories(policy, samples, range(len(samples)), rows, 1.0, (0, 0))
    assert cropped == crop_histories(policy, samples, range(len(samples)), rows, 1.0, (0, 0))  # seeded
    sep = policy.tokenizer.convert_tokens_to_ids("<sep>")
    for (prompt, target), (full_prompt, full_target), s in zip(cropped, rows, samples, strict=True):
        assert target == full_target and prompt[-1] == sep
        kept = (len(prompt) - 1) // 3
        assert 1 <= kept < len(s.history) and full_prompt[-len(prompt) :] == prompt  # a suffix of the history
    assert crop_histories(policy, samples, range(len(samples)), rows, 0.0, (0, 0)) == rows


def test_a_crop_shortens_what_the_prompt_holds_of_a_history_longer_than_its_window(tiny_dataset) -> None:
    """A history longer than ``--max-history`` shows the prompt its most recent items alone: a crop to a suffix
    as long as that window or longer trained the uncropped row, so ``--crop-prob`` cropped less the longer the
    histories (a 30-item history under a 10-item window: 9 of 29 crops shortened the prompt)."""
    policy = Policy.from_preset("tiny", tiny_dataset.catalog, max_history=3)
    samples = [s for s in tiny_dataset.splits["train"] if len(s.history) >= 6][:20]
    rows = [encode_sample(policy, s) for s in samples]
    assert all((len(p) - 1) // 3 == 3 for p, _ in rows)  # each prompt holds the window's 3 items
    for seed in range(5):
        cropped = crop_histories(policy, samples, range(len(samples)), rows, 1.0, (seed, 0))
        for (prompt, target), (full_prompt, full_target) in zip(cropped, rows, strict=True):
            assert target == full_target and full_prompt[-len(prompt) :] == prompt  # a suffix of what was shown
            assert 1 <= (len(prompt) - 1) // 3 < 3  # shorter than the window: a crop the model sees


def test_last_item_crop_keeps_the_last_item_alone(tiny_dataset) -> None:
    policy = Policy.from_preset("tiny", tiny_dataset.catalog)
    samples = [s for s in tiny_dataset.splits["train"] if len(s.history) > 3][:20]
    rows = [encode_sample(policy, s) for s in samples]
    cropped = crop_histories(policy, samples, range(len(samples)), rows, 0.0, (0, 0), last_item_prob=1.0)
    for (prompt, target), s in zip(cropped, samples, strict=True):
        assert (prompt, target) == encode_sample(policy, Sample(s.user_id, s.history[-1:], s.target))
    mixed = crop_histories(policy, samples, range(len(samples)), rows, 0.5, (0, 1), last_item_prob=0.5)
    kept = [(len(p) - 1) // 3 for p, _ in mixed]
    assert all(1 <= k < len(s.history) for k, s in zip(kept, samples, strict=True)) and kept.count(1) < len(kept)
    with pytest.raises(ValueError, match="last_item_prob"):
        SFTConfig(crop_prob=0.6, last_item_prob=0.5)


def test_a_slice_of_the_batch_is_cropped_as_in_the_whole_batch(tiny_dataset) -> None:
    """A DDP rank crops its slice of the global batch with the draws one process gives those rows (rows with one
    history item draw nothing, so the slices' draws depend on the rows before them)."""
    policy = Policy.from_preset("tiny", tiny_dataset.catalog)
    samples = tiny_dataset.splits["train"][:30]
    assert any(len(s.history) < 2 for s in samples[:12])
    batch = list(range(len(samples)))
    rows = [encode_sample(policy, s) for s in samples]
    whole = crop_histories(policy, samples, batch, rows, 0.4, (0, 5), last_item_prob=0.3)
    assert whole != rows
    for lo, hi in [(0, 12), (12, 30), (29, 30)]:
        assert crop_histories(policy, samples, batch, rows[lo:hi], 0.4, (0, 5), 0.3, start=lo) == whole[lo:hi]


def test_text_init_puts_similar_tokens_close(tiny_dataset) -> None:
    policy = Policy.from_preset("tiny", tiny_dataset.catalog, seed=0)
    emb = tiny_dataset.embeddings.copy()
    cat = tiny_dataset.catalog
    first = [it.sid[0] for it in cat.items.values()]
    emb[:] = [
        [1.0, 0.0] + [0.0] * (emb.shape[1] - 2) if f == first[0] else [0.0, 1.0] + [0.0] * (emb.shape[1] - 2)
        for f in first
    ]
    init_sid_embeddings(policy, emb)
    table = policy.model.get_input_embeddings().weight
    ids = policy.tokenizer.convert_tokens_to_ids(cat.tokens_of_level(0))
    same = [i for i, t in zip(ids, cat.tokens_of_level(0), strict=True) if t != first[0]]
    assert torch.allclose(table[same[0]], table[same[1]], atol=1e-5)  # identical text -> identical init
    assert not torch.allclose(table[same[0]], table[policy.tokenizer.convert_tokens_to_ids(first[0])], atol=1e-3)


def test_embedding_dropout_only_while_training(tiny_dataset) -> None:
    policy = Policy.from_preset("tiny", tiny_dataset.catalog, seed=0)
    add_embedding_dropout(policy, 0.5)
    ids, mask = policy.encode_prompts([[tiny_dataset.catalog.sids[0]]])
    policy.model.eval()
    a, b = (policy.model(input_ids=ids, attention_mask=mask).logits for _ in range(2))
    assert torch.equal(a, b)
    policy.model.train()
    c, d = (policy.model(input_ids=ids, attention_mask=mask).logits for _ in range(2))
    assert not torch.equal(c, d)


def test_holdout_zero_trains_on_all_of_valid_and_keeps_the_last(tiny_dataset, tmp_path: Path) -> None:
    config = SFTConfig(preset="tiny", max_steps=3, batch_size=64, train_splits=("train", "valid"), holdout=0)
    train, select = split_for_training(tiny_dataset, config)
    assert len(train) == 200 + 40 and select == []
    summary = train_sft(tiny_dataset, tmp_path / "refit", config, progress=False)
    assert summary["selection_rows"] == 0 and summary["history"][-1] == {"step": 3, "epoch": 0}
    assert summary["best"] is None
    saved = load_checkpoint(tmp_path / "refit")
    assert saved.manifest["selection"]["step"] == 3


def test_text_init_covers_item_tokens(tiny_dataset) -> None:
    from models.sid_tokenizer import item_token

    policy = Policy.from_preset("tiny", tiny_dataset.catalog, seed=0, item_tokens=True)
    cat = tiny_dataset.catalog
    emb = tiny_dataset.embeddings.copy()
    emb[:] = 0.0
    emb[cat.items_of_sid[0], 0] = 1.0  # only SID 0's items differ
    table = policy.model.get_input_embeddings().weight
    before = table.detach().clone()
    init_sid_embeddings(policy, emb)
    ids = policy.tokenizer.convert_tokens_to_ids([item_token(s) for s in cat.sids[:3]])
    assert not torch.equal(table[ids], before[ids])  # initialised
    assert torch.allclose(table[ids[1]], table[ids[2]], atol=1e-5)  # same text mean -> same init
    assert not torch.allclose(table[ids[0]], table[ids[1]], atol=1e-3)


def test_residual_dropout_only_while_training(tiny_dataset) -> None:
    from training.sft.regularisers import add_residual_dropout

    policy = Policy.from_preset("tiny", tiny_dataset.catalog, seed=0)
    ids, mask = policy.encode_prompts([[tiny_dataset.catalog.sids[0], tiny_dataset.catalog.sids[1]]])
    policy.model.eval()
    before = policy.model(input_ids=ids, attention_mask=mask).logits
    add_residual_dropout(policy, 0.5)
    assert torch.equal(policy.model(input_ids=ids, attention_mask=mask).logits, before)  # eval: untouched
    policy.model.train()
    c, d = (policy.model(input_ids=ids, attention_mask=mask).logits for _ in range(2))
    assert not torch.equal(c, d)


def test_denormal_flushing_is_scoped_to_training(tiny_dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    during: list[bool] = []
    real_step = torch.optim.AdamW.step

    def step(self: torch.optim.AdamW, *args: object, **kwargs: object) -> object:
        during.append(torch.tensor(1e-40, dtype=torch.float32).item() == 0.0)  # flushed to zero while training
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train_sft(tiny_dataset, tmp_path / "s", SFTConfig(preset="tiny", max_steps=1, eval_limit=4), progress=False)
    assert during == [True]
    assert torch.tensor(1e-40, dtype=torch.float32).item() != 0.0  # denormals work again afterwards


def test_auto_precision_asks_the_training_gpu_for_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """--device cuda:1: the GPU asked is cuda:1 (torch asks the current device, cuda:0 unless set), and auto takes
    bf16 only where it runs natively (an emulating GPU, compute capability 7, would run it slowly)."""
    import contextlib

    asked: list[tuple[str, bool]] = []
    current = ["cuda:0"]

    @contextlib.contextmanager
    def on(device: torch.device) -> Any:
        before, current[0] = current[0], str(device)
        yield
        current[0] = before

    def supported(including_emulation: bool = True) -> bool:
        asked.append((current[0], including_emulation))
        return including_emulation  # an emulating GPU

    monkeypatch.setattr(torch.cuda, "device", on)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    gpu = torch.device("cuda:1")
    assert autocast_dtype(gpu) is None and autocast_dtype(gpu, "bf16") is torch.bfloat16
    assert asked == [("cuda:1", False), ("cuda:1", True)]


def test_precision_picks_the_autocast_dtype_and_rejects_unknown_names() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu) is None and autocast_dtype(cpu, "fp32") is None  # auto: fp32 on CPU
    assert autocast_dtype(cpu, "bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        SFTConfig(precision="fp16")


def test_sft_cli_names_bad_options_and_missing_data_without_a_traceback(tiny_data_dir, tmp_path) -> None:
    runner = CliRunner()
    bad = runner.invoke(app, ["sft", "--data", str(tiny_data_dir), "--out", str(tmp_path / "c"), "--precision", "fp16"])
    assert bad.exit_code == 2 and "'fp16' is not one of 'auto', 'fp32', 'bf16'" in bad.output
    assert "Traceback" not in bad.output
    missing = runner.invoke(app, ["sft", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c")])
    assert (
        missing.exit_code == 2 and "Invalid value for --data" in missing.output and "does not exist" in missing.output
    )
    assert not (tmp_path / "c").exists()


def test_ema_is_what_gets_saved_and_it_survives_a_resume(
    tiny_dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def weights(path: Path) -> dict[str, torch.Tensor]:
        return load_checkpoint(path).policy.model.state_dict()

    refit = {"preset": "tiny", "epochs": 2, "batch_size": 50, "seed": 1, "train_splits": ("train", "valid")}
    # a vanishing decay: the average is the last weights, so the swap in and out is exact
    train_sft(tiny_dataset, tmp_path / "near", SFTConfig(**refit, holdout=0, ema=1e-9), progress=False)
    near, raw = weights(tmp_path / "near"), weights(tmp_path / "near.resume")
    assert all(torch.allclose(near[k], raw[k], atol=1e-6) for k in raw)

    config = SFTConfig(**refit, holdout=0, ema=0.5)
    train_sft(tiny_dataset, tmp_path / "full", config, progress=False)
    kept, raw = weights(tmp_path / "full"), weights(tmp_path / "full.resume")
    assert any(not torch.allclose(kept[k], raw[k]) for k in raw if raw[k].is_floating_point())
    interrupt_at_step(6, monkeypatch, lambda: train_sft(tiny_dataset, tmp_path / "part", config, progress=False))
    train_sft(tiny_dataset, tmp_path / "part", config, resume=True, progress=False)
    resumed = weights(tmp_path / "part")
    assert all(torch.allclose(kept[k], resumed[k], atol=1e-6) for k in kept)

    selected = train_sft(
        tiny_dataset, tmp_path / "sel", SFTConfig(**refit, holdout=8, eval_limit=8, ema=0.5), progress=False
    )
    assert all("HR@10" in h for h in selected["history"])
    with pytest.raises(ValueError, match="ema must be in"):
        SFTConfig(ema=1.0)


def test_refit_trains_on_everything_with_the_held_out_runs_weight(
    tiny_dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = SFTConfig(
        preset="tiny", epochs=1, batch_size=50, train_splits=("train", "valid"), holdout=10, eval_limit=10, refit=True
    )
    assert config.refits and not SFTConfig(preset="tiny", refit=True).refits  # nothing held out: one run
    out = tmp_path / "ck"
    # the held-out run finishes (5 steps over 230 rows); the refit (5 over 240) is interrupted at its 2nd step
    interrupt_at_step(5 + 2, monkeypatch, lambda: train_sft(tiny_dataset, out, config, progress=False))
    heldout = load_checkpoint(tmp_path / "ck.heldout").manifest
    assert heldout["sft_config"]["holdout"] == 10 and heldout["fusion"]["chosen_by"] == "held-out"
    runs = []
    real = sft_module._train_sft
    monkeypatch.setattr(sft_module, "_train_sft", lambda *a, **k: runs.append(a[2]) or real(*a, **k))
    summary = train_sft(tiny_dataset, out, config, resume=True, progress=False)
    assert [c.holdout for c in runs] == [0]  # the finished held-out run is not trained again
    final = load_checkpoint(out).manifest
    assert final["sft_config"]["holdout"] == 0 and final["data"]["train_rows"] == 240
    assert final["fusion"] == {
        "weight": heldout["fusion"]["weight"],
        "chosen_by": "held-out run",
        "count_rows": 240,
    } | {"transition_pairs": final["fusion"]["transition_pairs"]}
    assert summary["steps"] == 5 and summary["heldout_run"]["fusion"]["weight"] == heldout["fusion"]["weight"]


def test_a_refit_with_an_empty_valid_split_trains_once(tiny_dataset, tmp_path: Path, monkeypatch) -> None:
    """With no valid row to hold out, a held-out run and its refit would train on the same rows twice: one run."""
    empty = replace(tiny_dataset, splits=tiny_dataset.splits | {"valid": []})
    config = SFTConfig(preset="tiny", max_steps=1, train_splits=("train", "valid"), holdout=10, refit=True)
    runs = []
    real = sft_module._train_sft
    monkeypatch.setattr(sft_module, "_train_sft", lambda *a, **k: runs.append(a[1]) or real(*a, **k))
    summary = train_sft(empty, tmp_path / "ck", config, progress=False)
    assert runs == [tmp_path / "ck"] and not (tmp_path / "ck.heldout").exists() and "heldout_run" not in summary
    assert load_checkpoint(tmp_path / "ck").manifest["fusion"]["chosen_by"] == "nothing held out"


def test_a_resumed_refit_reports_its_finished_held_out_run_as_the_run_did(
    tiny_dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refit interrupted after its held-out run finished: the resumed run's summary is the uninterrupted
    run's, ``heldout_run`` included (its figures read back from the held-out run's manifest), but for the wall
    time of the resumed part and the paths."""
    config = SFTConfig(
        preset="tiny", epochs=1, batch_size=50, train_splits=("train", "valid"), holdout=10, eval_limit=10, refit=True
    )
    full = train_sft(tiny_dataset, tmp_path / "full", config, progress=False)
    interrupt_at_step(5 + 2, monkeypatch, lambda: train_sft(tiny_dataset, tmp_path / "part", config, progress=False))
    part = train_sft(tiny_dataset, tmp_path / "part", config, resume=True, progress=False)
    full_heldout, part_heldout = full.pop("heldout_run"), part.pop("heldout_run")
    assert list(part_heldout) == list(full_heldout)  # checkpoint, best, steps, seconds, history, ... fusion
    wall = ("checkpoint", "seconds", "seconds_per_epoch")
    assert {k: v for k, v in part_heldout.items() if k not in wall} == {
        k: v for k, v in full_heldout.items() if k not in wall
    }
    assert part_heldout["seconds"] == load_checkpoint(tmp_path / "part.heldout").manifest["run"]["seconds"]
    assert set(part_heldout["best"]) == {"HR@10", "NDCG@10"} and part_heldout["fusion"]["transition_pairs"] > 0
    assert list(part) == list(full) and {k: v for k, v in part.items() if k not in wall} == {
        k: v for k, v in full.items() if k not in wall
    }


def test_text_init_without_embeddings_names_the_command_that_makes_them(tiny_dataset, tmp_path: Path) -> None:
    bare = replace(tiny_dataset, embeddings=None)
    config = SFTConfig(preset="tiny", max_steps=1, text_init=True)
    with pytest.raises(ValueError, match=r"needs item_emb.npy .*vstar embed --data DIR --encoder PATH.*--no-text-init"):
        train_sft(bare, tmp_path / "out", config, progress=False)
    assert not (tmp_path / "out").exists()


def test_the_recipes_text_init_gives_way_on_a_data_set_without_embeddings(
    tiny_data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """item_emb.npy is optional in the data format: the small recipe trains on a folder without it, with a warning
    naming what it lacks and the manifest saying text_init false; --text-init asked for is still refused."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    for name in ("item_emb.npy", "item_emb.json"):
        (data / name).unlink(missing_ok=True)
    args = ["sft", "--data", str(data), "--preset", "small", "--max-steps", "1", "--holdout", "8", "--eval-limit", "8",
            "--no-refit"]  # fmt: skip
    ran = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert ran.exit_code == 0, ran.output
    said = caplog.text
    assert "the small recipe's --text-init is off" in said and "has no item_emb.npy (make it with vstar embed" in said
    assert load_checkpoint(tmp_path / "a").manifest["sft_config"]["text_init"] is False
    asked = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b"), "--text-init"])
    assert asked.exit_code != 0 and "--text-init needs item_emb.npy" in asked.output
    assert not (tmp_path / "b").exists()


def test_fuse_chooses_on_its_grid_even_for_a_run_that_was_given_a_weight(tiny_dataset, tmp_path: Path) -> None:
    from training.sft.trainer import fuse_checkpoint

    config = SFTConfig(preset="tiny", max_steps=1, eval_limit=16, fusion_weight=2.0)
    train_sft(tiny_dataset, tmp_path / "a", config, progress=False)
    assert load_checkpoint(tmp_path / "a").manifest["fusion"]["chosen_by"] == "given"
    fusion = fuse_checkpoint(tmp_path / "a", tiny_dataset, weights=(0.0, 1.0))  # it kept 2.0, off the grid
    assert fusion["weight"] in (0.0, 1.0) and fusion["chosen_by"] == "held-out"
    assert load_checkpoint(tmp_path / "a").manifest["fusion"]["weight"] == fusion["weight"]


def test_text_init_from_embeddings_that_are_all_alike_is_refused_not_a_model_of_nans(tiny_dataset, tmp_path) -> None:
    from dataclasses import replace

    import numpy as np

    alike = replace(tiny_dataset, embeddings=np.ones_like(tiny_dataset.embeddings))
    config = SFTConfig(preset="tiny", max_steps=1, text_init=True)
    with pytest.raises(ValueError, match=r"item_emb.npy\) are the same for every SID.*--no-text-init"):
        train_sft(alike, tmp_path / "out", config, progress=False)
    assert not (tmp_path / "out").exists()


def test_resume_refuses_a_finished_held_out_run_of_another_configuration_or_data(tiny_dataset, tmp_path: Path) -> None:
    """A finished ``<out>.heldout`` gives the refit its fusion weight: --resume takes it only from the same
    configuration and data, as it takes a ``.resume`` folder (it used to look only for its fusion choice)."""
    from dataclasses import asdict, replace

    config = SFTConfig(preset="tiny", max_steps=1, train_splits=("train", "valid"), holdout=10, refit=True, seed=1)
    heldout = tmp_path / "ck.heldout"
    heldout.mkdir()
    manifest = {
        "stage": "sft",
        "sft_config": asdict(config),
        "data": {"name": tiny_dataset.name, "fingerprint": tiny_dataset.fingerprint()},
        "fusion": {"weight": 4.0, "chosen_by": "held-out"},
        "run": {"best": {"HR@10": 0.1, "NDCG@10": 0.05}, "steps": 1},
    }
    (heldout / "manifest.json").write_text(json.dumps(manifest))
    assert sft_module.finished_heldout_run(heldout, config, tiny_dataset)["fusion"]["weight"] == 4.0
    other = replace(config, seed=9, lr=0.0005)
    with pytest.raises(ValueError, match=r"different configuration \(lr \(0.002 there, 0.0005 now\); seed \(1 there"):
        train_sft(tiny_dataset, tmp_path / "ck", other, resume=True, progress=False)
    (heldout / "manifest.json").write_text(json.dumps(manifest | {"data": {"fingerprint": "another"}}))
    with pytest.raises(ValueError, match="ck.heldout was trained on other data"):
        train_sft(tiny_dataset, tmp_path / "ck", config, resume=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.heldout"]  # refused before anything is written


def test_a_fresh_run_clears_an_earlier_runs_side_files_once_its_checks_pass(tiny_dataset, tmp_path: Path) -> None:
    """Without --resume, an earlier run's resume state, held-out run and default curves go before the new run
    writes (nothing of them mixes in); a fresh run refused by its checks loses none of them."""
    from dataclasses import replace

    out = tmp_path / "ck"
    names = ["ck/manifest.json", "ck.resume/manifest.json", "ck.heldout/manifest.json", "ck.tb/events.out.tfevents.0",
             "ck.tb-heldout/events.out.tfevents.1", "mine.tb/events.out.tfevents.2"]  # fmt: skip
    earlier = [tmp_path / name for name in names]
    for path in earlier:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    config = SFTConfig(preset="tiny", max_steps=1, batch_size=50, eval_limit=4)
    with pytest.raises(ValueError, match="--text-init needs item_emb.npy"):
        train_sft(replace(tiny_dataset, embeddings=None), out, replace(config, text_init=True), progress=False)
    assert all(p.read_text() == "{}" for p in earlier)
    train_sft(tiny_dataset, out, config, progress=False, tensorboard=tmp_path / "mine.tb")
    assert not any((tmp_path / name).exists() for name in ("ck.heldout", "ck.tb", "ck.tb-heldout"))
    assert load_checkpoint(tmp_path / "ck.resume").trainer_state()["train_state"]["step"] == 1
    assert load_checkpoint(out).manifest["stage"] == "sft"
    assert len(list((tmp_path / "mine.tb").iterdir())) == 2  # a folder the user named is not cleared


def test_cli_sft_onto_an_earlier_run_needs_resume_or_force(tiny_data_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "ck"
    args = ["sft", "--data", str(tiny_data_dir), "--out", str(out), "--preset", "tiny", "--max-steps", "1",
            "--eval-limit", "4"]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0
    kept = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    again = runner.invoke(app, [*args, "--seed", "3"])
    assert again.exit_code == 2 and "--resume continues it, --force replaces it" in again.output, again.output
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == kept
    (tmp_path / "ck.heldout").mkdir()  # a held-out run of an earlier --refit at the same --out
    forced = runner.invoke(app, [*args, "--seed", "3", "--force"])
    assert forced.exit_code == 0, forced.output
    assert load_checkpoint(out).manifest["sft_config"]["seed"] == 3 and not (tmp_path / "ck.heldout").exists()
    assert len(list((tmp_path / "ck.tb").iterdir())) == 1  # the new run's curves alone


def test_a_run_that_starts_over_under_resume_purges_its_own_earlier_curves(
    tiny_dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refit's held-out run, or the refit, interrupted after its first step but before its first validation has
    no resume state: --resume starts it over. Its curves used to keep the interrupted attempt's step 1 beside the
    new one's (TensorBoard purges only a step that goes back, and 1 does not go back from 1)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def curves(folder: Path) -> dict[str, list[tuple[int, float]]]:
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

    config = SFTConfig(
        preset="tiny", epochs=1, batch_size=50, train_splits=("train", "valid"), holdout=10, eval_limit=10, refit=True
    )
    train_sft(tiny_dataset, tmp_path / "full", config, progress=False, tensorboard=tmp_path / "full.tb")
    full = curves(tmp_path / "full.tb"), curves(tmp_path / "full.tb-heldout")
    assert [s for s, _ in full[0]["train/lr"]] == [1, 2, 3, 4, 5] == [s for s, _ in full[1]["train/loss"]]
    for name, crash in (("heldout", 2), ("refit", 5 + 2)):  # each run validates once, at its 5th and last step
        out, tb = tmp_path / name, tmp_path / f"{name}.tb"
        run = functools.partial(train_sft, tiny_dataset, out, config, progress=False, tensorboard=tb)
        interrupt_at_step(crash, monkeypatch, run)
        next_second()  # a real resume is a later process: its event file sorts after the interrupted one's
        run(resume=True)
        assert (curves(tb), curves(tmp_path / f"{name}.tb-heldout")) == full, name


def test_a_vstar_checkpoint_as_base_model_is_refused(tiny_data_dir: Path, tmp_path: Path) -> None:
    """A vstar checkpoint has a config.json and loads as a causal LM, so --base-model trained from it: with the text
    prompt of a pretrained LM, whose words its tokenizer lacks (each an <unk>), and SIDs that may be another
    catalog's. One line instead, before any work; the API refuses it too, before an earlier run's files go."""
    ck = tmp_path / "ck"
    args = ["sft", "--data", str(tiny_data_dir), "--out", str(ck), "--preset", "tiny", "--max-steps", "1",
            "--eval-limit", "4"]  # fmt: skip
    assert CliRunner().invoke(app, args).exit_code == 0
    kept = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = CliRunner().invoke(app, [*args[:5], "--base-model", str(ck), "--force", *args[7:]])
    assert result.exit_code == 2 and f"--base-model {ck} is a vstar checkpoint, not a pretrained LM" in result.output
    assert "Traceback" not in result.output
    with pytest.raises(ValueError, match="is a vstar checkpoint"):
        train_sft(load_dataset(tiny_data_dir), ck, SFTConfig(base_model=str(ck), max_steps=1), progress=False)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == kept


def test_a_refit_does_not_keep_the_held_out_runs_model_alive(tiny_dataset, tmp_path: Path, monkeypatch) -> None:
    """The held-out run's model, built before the side files are cleared (``start_fresh``), is freed once that run
    ends: the refit trains a model of its own, and two models at once would double a large --base-model's memory."""
    import gc
    import weakref

    built: list[weakref.ref] = []
    real_fresh, real_run = sft_module.fresh_policy, sft_module._train_sft
    alive_at_refit: list[bool] = []

    def fresh(*args: Any, **kwargs: Any) -> Policy:
        policy = real_fresh(*args, **kwargs)
        built.append(weakref.ref(policy.model))
        return policy

    def run(data: Any, out: Path, config: SFTConfig, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if config.holdout == 0:  # the refit: the held-out run has ended
            gc.collect()
            alive_at_refit.append(built[0]() is not None)
        return real_run(data, out, config, *args, **kwargs)

    monkeypatch.setattr(sft_module, "fresh_policy", fresh)
    monkeypatch.setattr(sft_module, "_train_sft", run)
    config = SFTConfig(preset="tiny", max_steps=1, batch_size=50, train_splits=("train", "valid"), holdout=10,
                       eval_limit=10, refit=True)  # fmt: skip
    train_sft(tiny_dataset, tmp_path / "ck", config, progress=False)
    assert alive_at_refit == [False]


def test_max_history_is_the_prompts_window_and_the_checkpoint_keeps_it(
    tiny_data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "ck"
    args = ["sft", "--data", str(tiny_data_dir), "--out", str(out), "--preset", "tiny", "--max-steps", "1",
            "--eval-limit", "4", "--max-history", "2"]  # fmt: skip
    with caplog.at_level("INFO"):
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    policy = load_checkpoint(out).policy
    assert policy.prompt.max_history == 2
    rows = load_dataset(tiny_data_dir).splits["train"]
    cut = sum(len(s.history) > 2 for s in rows)
    assert 0 < cut and f"{cut} of {len(rows)} training rows have more than 2 history items" in caplog.text
    refused = CliRunner().invoke(app, [*args[:-1], "0", "--force"])
    assert refused.exit_code == 2 and "--max-history" in refused.output


def test_an_sft_checkpoint_carries_its_datas_external_ids(tiny_dataset, tmp_path: Path) -> None:
    """Trained on a folder with item_map.json, the checkpoint knows the items' own ids for the service."""
    external = {i: f"SKU-{i}" for i in tiny_dataset.catalog.items}
    named = replace(tiny_dataset, catalog=tiny_dataset.catalog.with_external_ids(external))
    config = SFTConfig(preset="tiny", max_steps=1, batch_size=16, eval_limit=4, seed=3)
    train_sft(named, tmp_path / "named", config, progress=False)
    assert load_checkpoint(tmp_path / "named").policy.catalog.external_ids == external
