"""Training curves: SFT and RL write TensorBoard scalars (a resume does not double them), `vstar plot` draws them."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from models.checkpoint import save_checkpoint
from models.policy import Policy
from tests.conftest import next_second
from training.data.dataset import RecDataset
from training.evaluation.curve_plot import event_folder, plot_runs, read_curves, run_labels, smooth
from training.rl.config import RLConfig
from training.rl.run import train_rl
from training.sft.config import SFTConfig
from training.sft.trainer import train_sft
from vstar import app

SFT = SFTConfig(preset="tiny", epochs=2, batch_size=50, eval_limit=8, seed=1)  # 4 steps per epoch, validated each


def interrupt_at_step(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The optimizer's ``n``-th step raises KeyboardInterrupt (a crash mid-training)."""
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def crashing(self: torch.optim.AdamW, *args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == n:
            monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", crashing)


def test_sft_curves_survive_a_resume_without_doubling(
    tiny_dataset: RecDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = train_sft(tiny_dataset, tmp_path / "full", SFT, progress=False, tensorboard=tmp_path / "full.tb")
    interrupt_at_step(6, monkeypatch)  # the resume point is the validation after step 4
    with pytest.raises(KeyboardInterrupt):
        train_sft(tiny_dataset, tmp_path / "part", SFT, progress=False, tensorboard=tmp_path / "part.tb")
    next_second()
    train_sft(tiny_dataset, tmp_path / "part", SFT, resume=True, progress=False, tensorboard=tmp_path / "part.tb")

    a, b = read_curves(tmp_path / "full.tb"), read_curves(tmp_path / "part.tb")
    assert set(a) == {"train/loss", "train/lr", "heldout/HR@10", "heldout/NDCG@10"} == set(b)
    assert a["train/loss"][0] == b["train/loss"][0] == list(range(1, 9))  # steps 5 and 6 once, not twice
    assert b["train/loss"][1] == pytest.approx(a["train/loss"][1], abs=1e-4)
    lr = a["train/lr"][1]  # float32 in the event file
    assert b["train/lr"][1] == pytest.approx(lr) and lr[0] == pytest.approx(2e-3) and lr[-1] < lr[0]
    assert a["heldout/HR@10"][0] == [4, 8]
    assert a["heldout/HR@10"][1] == pytest.approx([h["HR@10"] for h in full["history"]])


def test_rl_curves_have_the_step_figures_and_the_init_score(
    tiny_dataset: RecDataset, tiny_policy: Policy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    init = save_checkpoint(tmp_path / "init", tiny_policy, {"stage": "sft"})
    config = RLConfig(algo="vstar", ved=False, max_steps=2, batch_size=4, eval_every=2, eval_limit=8)
    summary = train_rl(tiny_dataset, init, tmp_path / "rl", config, progress=False, tensorboard=tmp_path / "rl.tb")
    with caplog.at_level(logging.INFO):  # as `vstar demo` logs: the reader's INFO line per run was noise there
        curves = read_curves(event_folder(tmp_path / "rl"))  # <out>.tb is found from the checkpoint folder
    assert not [r for r in caplog.records if r.name.startswith("tensorboard")], caplog.records
    assert logging.getLogger("tensorboard").level == logging.NOTSET  # put back as it was
    steps = [json.loads(line) for line in Path(summary["steps_log"]).read_text().splitlines()]
    for figure in ("reward_std", "reachability", "value_loss"):
        assert curves[f"rl/{figure}"] == ([1, 2], pytest.approx([s[figure] for s in steps]))
    assert curves["train/loss"][0] == [1, 2] and curves["train/lr"][0] == [1, 2]
    assert curves["heldout/NDCG@10"] == ([0, 2], pytest.approx([h["NDCG@10"] for h in summary["history"]]))


def test_plot_draws_runs_and_names_a_folder_without_curves(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    for name, tags in (("sft", ("train/loss", "heldout/HR@10")), ("rl", ("train/loss", "rl/reachability"))):
        with SummaryWriter(str(tmp_path / f"{name}.tb")) as w:
            for step in range(1, 6):
                for tag in tags:
                    w.add_scalar(tag, 1.0 / step, step)
    png = plot_runs([tmp_path / "sft", tmp_path / "rl.tb"], tmp_path / "out" / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "out"), "--out", str(tmp_path / "x.png")])
    assert (
        result.exit_code == 2
        and result.output.strip() == f"Error: no TensorBoard event files in {tmp_path / 'out'} or {tmp_path / 'out.tb'}"
    )
    assert not (tmp_path / "x.png").exists()
    with SummaryWriter(str(tmp_path / "other.tb")) as w:  # event files, but none of the curves
        w.add_scalar("other/thing", 1.0, 1)
    with pytest.raises(ValueError, match=rf"none of train/loss, .* in {tmp_path / 'other'}$"):
        plot_runs([tmp_path / "sft", tmp_path / "other"], tmp_path / "y.png")  # was a blank row beside sft's
    assert not (tmp_path / "y.png").exists()


def test_smoothing_is_tensorboards_debiased_average() -> None:
    assert smooth([2.0, 2.0, 2.0], 0.6) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards the zero start
    assert smooth([0.0, 1.0], 0.5) == pytest.approx([0.0, 0.5 / 0.75])  # (0.5 * 0 + 0.5 * 1) / (1 - 0.5**2)
    assert smooth([3.0, 1.0], 0.0) == [3.0, 1.0]
    # a nan loss is drawn as it is and skipped: the points after it are the average of the finite ones
    nan = smooth([0.0, math.nan, 1.0], 0.5)
    assert math.isnan(nan[1]) and [nan[0], nan[2]] == pytest.approx([0.0, 0.5 / 0.75])
    assert smooth([2.0, math.inf, 2.0], 0.6)[2] == pytest.approx(2.0)


def test_a_plot_cut_short_leaves_the_earlier_figure_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``vstar plot --out`` onto an earlier PNG: a write that fails half way (a full disk, Ctrl-C) leaves the
    earlier figure as it was; savefig wrote straight onto it, which truncated it first."""
    import errno
    import io

    from matplotlib.figure import Figure
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "sft.tb")) as w:
        for step in range(1, 4):
            w.add_scalar("train/loss", 1.0 / step, step)
    png = tmp_path / "curves.png"
    earlier = plot_runs([tmp_path / "sft"], png).read_bytes()
    savefig = Figure.savefig

    def half_then_full_disk(self: Figure, fname: object, **kwargs: Any) -> None:
        whole = io.BytesIO()
        savefig(self, whole, **{"format": "png", **kwargs})
        half = whole.getvalue()[: len(whole.getvalue()) // 2]
        if isinstance(fname, (str, Path)):  # as savefig does with a path: open it for writing, truncated
            with open(fname, "wb") as f:
                f.write(half)
        else:
            fname.write(half)  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_then_full_disk)
    with pytest.raises(OSError, match="No space left"):
        plot_runs([tmp_path / "sft"], png, smoothing=0.0)
    assert png.read_bytes() == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "sft.tb"]


def test_a_damaged_event_file_is_warned_about_and_a_cut_one_is_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """TensorBoard's reader stops at a record that fails its checksum and says so at DEBUG alone: the figure
    showed a run cut short, without a word."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "run.tb")) as w:
        for step in range(1, 61):
            w.add_scalar("train/loss", 1.0 / step, step)
    (events,) = (tmp_path / "run.tb").glob("events.out.tfevents.*")
    whole = events.read_bytes()
    events.write_bytes(whole[: len(whole) - 7])  # a run stopped mid-write: its last record cut
    with caplog.at_level(logging.WARNING):
        assert 50 < len(read_curves(tmp_path / "run.tb")["train/loss"][0]) < 60
    assert "damaged" not in caplog.text
    middle = len(whole) // 2
    events.write_bytes(whole[:middle] + b"\xff" * 10 + whole[middle + 10 :])
    with caplog.at_level(logging.WARNING):
        assert len(read_curves(tmp_path / "run.tb")["train/loss"][0]) < 40
    assert f"{tmp_path / 'run.tb'}: a damaged record, which the curves stop before" in caplog.text


def test_runs_of_one_name_are_told_apart_by_the_folders_above_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs named vstar (seeds 0 and 1) had the same titles; "." had none."""
    assert run_labels([tmp_path / "s0" / "vstar", tmp_path / "s1" / "vstar", tmp_path / "sft"]) == [
        "s0/vstar",
        "s1/vstar",
        "sft",
    ]
    monkeypatch.chdir(tmp_path)
    assert run_labels([Path(".")]) == [tmp_path.name]
