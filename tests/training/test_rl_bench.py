"""``vstar bench train``: how its two trainers are timed (the figures themselves: ``test_rl.py``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from training.bench import rl_bench, timing
from training.data.dataset import Sample
from training.data.sid_builder import SidBuildConfig
from training.data.synth import SynthConfig, write_synth
from training.rl.trainer import RLTrainer
from vstar import app


def test_the_two_trainers_take_their_steps_in_turn_each_timed_on_the_models_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """All GRPO steps ran before all V-STAR steps, so load that came or went between them counted for one alone;
    and the figure was the trainer's own clock, read with the device's work possibly still queued."""
    order: list[str] = []

    def step(self: RLTrainer, samples: list[Sample], counted: bool = True) -> dict[str, float]:
        order.append(self.config.algo)
        return {"seconds": 0.0}

    waits: list[object] = []
    monkeypatch.setattr(RLTrainer, "step", step)
    monkeypatch.setattr(timing, "synchronize", waits.append)
    result = rl_bench.run_train_bench(None, None, "tiny", batch_size=2, steps=2, budget=None, device="cpu")
    assert order == ["grpo", "vstar"] * 3  # a warm-up step each, then two timed rounds
    assert len(waits) == 2 * 4  # a wait before and after each timed step
    assert set(result) == {"grpo_s_per_step", "vstar_s_per_step"}


def test_a_budget_the_initial_tree_cannot_fit_is_refused_before_any_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """It was found by V-STAR's first rollout, after every GRPO step had been timed."""
    steps: list[str] = []
    monkeypatch.setattr(RLTrainer, "step", lambda self, samples: steps.append(self.config.algo) or {})
    with pytest.raises(ValueError, match="budget 20 is below"):
        rl_bench.run_train_bench(None, None, "tiny", batch_size=2, steps=1, budget=20, device="cpu")
    assert steps == []


def test_data_vstar_rl_refuses_is_refused_in_one_line(tiny_data_dir: Path, tmp_path: Path) -> None:
    """A catalog of fewer SIDs than a group was timed as "x 16 candidates" (each group the whole catalog, which
    vstar rl refuses), and data without embeddings was told to pass --no-dense, which bench train does not have."""
    small = tmp_path / "small"
    write_synth(small, SynthConfig(items=10, users=30), SidBuildConfig(None, seed=0))
    no_embeddings = tmp_path / "no_emb"
    shutil.copytree(tiny_data_dir, no_embeddings, ignore=shutil.ignore_patterns("item_emb.npy"))
    for data, message in (
        (small, "--num-candidates 16 is not fewer than the 10 SIDs of small's catalog"),
        (no_embeddings, "no_emb has no item_emb.npy: V-STAR's dense reward, timed here, needs item embeddings"),
    ):
        result = CliRunner().invoke(app, ["bench", "train", "--data", str(data), "--steps", "1"])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
