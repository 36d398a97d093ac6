"""DDP on CPU: ``torchrun --nproc-per-node 2`` (gloo) against one in-process run with the same global batch.

Each 2-process run goes through the real CLI under ``torch.distributed.run``,
behind a launcher that records every ``save_checkpoint`` call with its rank, so
the test also sees that rank 0 alone wrote. Batch sizes are chosen so that the
shards are unequal (the loss weighting matters) and one step has a global batch
of one row (rank 1 runs a weight-0 stand-in).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.checkpoint import load_checkpoint
from training.data.dataset import RecDataset
from training.distributed import Shard, global_mean, loss_scales, shard, weighted_mean
from training.evaluation.curve_plot import read_curves
from training.loop import epoch_batches
from training.rl.config import RLConfig
from training.rl.run import train_rl
from training.sft.config import SFTConfig
from training.sft.trainer import train_sft

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300
ATOL = 1e-5
LAUNCHER = """
import os
import models.checkpoint as checkpoint

real_save = checkpoint.save_checkpoint


def spy(path, *args, **kwargs):
    with open(os.environ["VSTAR_TEST_WRITES"], "a") as f:
        f.write(f"{os.environ['RANK']} {path}\\n")
    return real_save(path, *args, **kwargs)


checkpoint.save_checkpoint = spy  # before the CLI imports training.sft.trainer / training.rl.run
from vstar import main  # noqa: E402

main()
"""


def torchrun(
    tmp_path: Path, args: list[str], nproc: int = 2, before: str = ""
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run ``vstar ARGS`` under torchrun with ``nproc`` CPU processes (``before``: code the launcher runs
    first); returns the result and the recorded writes."""
    launcher, writes = tmp_path / "launch.py", tmp_path / "writes.txt"
    launcher.write_text(before + LAUNCHER)
    writes.unlink(missing_ok=True)
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VSTAR_TEST_WRITES": str(writes),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(launcher)]
    result = subprocess.run(cmd + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    return result, (writes.read_text().splitlines() if writes.exists() else [])


def max_abs_diff(a: Path, b: Path, extra: str | None = None) -> float:
    """Largest |difference| over the policy parameters (or the ``extra`` state dict) of two checkpoints."""
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    sa = ca.extras[extra] if extra else ca.policy.model.state_dict()
    sb = cb.extras[extra] if extra else cb.policy.model.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


def assert_rank0_wrote(writes: list[str], *paths: Path) -> None:
    assert writes, "no checkpoint was written"
    assert {w.split(" ", 1)[0] for w in writes} == {"0"}, writes
    assert {Path(w.split(" ", 1)[1]) for w in writes} == set(paths), writes


# ---- helpers, in one process (no process group: the identity)


def test_helpers_are_the_identity_without_a_launcher() -> None:
    assert shard([4, 5, 6]) == Shard([4, 5, 6], True, [4, 5, 6], 0)
    assert loss_scales([3, 0]) == [1.0, 1.0]
    assert global_mean(0.25, 7) == 0.25
    assert weighted_mean({"a": 0.1, "seconds": 2.0}, 7, maxed=("seconds",), summed=("a",)) == {"a": 0.1, "seconds": 2.0}


# ---- 2 processes against 1


@pytest.mark.slow
def test_sft_two_processes_match_one(tiny_dataset: RecDataset, tiny_data_dir: Path, tmp_path: Path) -> None:
    # 200 rows, global batch 199: step shards of 99/100 rows, then a 1-row batch (rank 1: weight-0 stand-in)
    assert sorted(len(b) for b in epoch_batches([1] * 200, 199, 3, 0)) == [1, 199]
    config = SFTConfig(preset="tiny", max_steps=2, batch_size=199, lr=1e-2, seed=3)
    one = train_sft(tiny_dataset, tmp_path / "one", config, progress=False, tensorboard=tmp_path / "one.tb")
    args = ["sft", "--data", str(tiny_data_dir), "--out", str(tmp_path / "two"), "--preset", "tiny"]
    args += ["--max-steps", "2", "--batch-size", "199", "--lr", "0.01", "--seed", "3"]
    result, writes = torchrun(tmp_path, args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_rank0_wrote(writes, tmp_path / "two", tmp_path / "two.resume")
    diff = max_abs_diff(tmp_path / "one.resume", tmp_path / "two.resume")
    print(f"SFT 2 vs 1 process: max |param diff| {diff:.3g}")
    assert diff < ATOL
    assert max_abs_diff(tmp_path / "one.resume", tmp_path / "one") == 0.0  # trained, selected at step 2
    assert load_checkpoint(tmp_path / "two.resume").trainer_state()["train_state"]["step"] == one["steps"] == 2
    # the loss curve is the global batch's, not rank 0's slice's (its 99 rows: 9.9e-4 off at step 1)
    one_loss, two_loss = (read_curves(tmp_path / f"{run}.tb")["train/loss"] for run in ("one", "two"))
    assert one_loss[0] == two_loss[0] == [1, 2]
    assert two_loss[1] == pytest.approx(one_loss[1], abs=1e-5)


@pytest.mark.slow
def test_sft_history_crops_match_one_process(tiny_dataset: RecDataset, tiny_data_dir: Path, tmp_path: Path) -> None:
    # the small recipe crops histories (--crop-prob, --last-item-prob): a rank crops its rows as one process crops
    # them in the global batch, not with the draws one process gives the batch's first rows
    config = SFTConfig(preset="tiny", max_steps=2, batch_size=199, lr=1e-2, seed=3, crop_prob=0.5, last_item_prob=0.3)
    train_sft(tiny_dataset, tmp_path / "one", config, progress=False)
    args = ["sft", "--data", str(tiny_data_dir), "--out", str(tmp_path / "two"), "--preset", "tiny"]
    args += ["--max-steps", "2", "--batch-size", "199", "--lr", "0.01", "--seed", "3"]
    args += ["--crop-prob", "0.5", "--last-item-prob", "0.3"]
    result, _ = torchrun(tmp_path, args)
    assert result.returncode == 0, result.stderr[-3000:]
    diff = max_abs_diff(tmp_path / "one.resume", tmp_path / "two.resume")
    print(f"SFT with crops 2 vs 1 process: max |param diff| {diff:.3g}")
    assert diff < ATOL


@pytest.mark.slow
def test_sft_refit_runs_on_every_rank(tiny_dataset: RecDataset, tiny_data_dir: Path, tmp_path: Path) -> None:
    # the held-out run's fusion weight is chosen with each rank scoring its half of the held-out rows (the grid
    # row-weighted over the ranks: one process's grid), and the refit on every rank trains with it
    config = SFTConfig(preset="tiny", max_steps=2, batch_size=64, lr=1e-2, train_splits=("train", "valid"), holdout=20,
                       eval_limit=20, refit=True)  # fmt: skip
    one = train_sft(tiny_dataset, tmp_path / "one", config, progress=False)
    args = ["sft", "--data", str(tiny_data_dir), "--out", str(tmp_path / "two"), "--preset", "tiny", "--refit"]
    args += ["--max-steps", "2", "--batch-size", "64", "--lr", "0.01", "--train-splits", "train,valid"]
    args += ["--holdout", "20", "--eval-limit", "20", "--json", str(tmp_path / "two.json")]
    result, _ = torchrun(tmp_path, args)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["fusion"]["weight"] == two["heldout_run"]["fusion"]["weight"] == one["fusion"]["weight"]
    grids = [run["heldout_run"]["fusion"]["grid"] for run in (one, two)]
    assert [[row["weight"] for row in g] for g in grids] == [[row["weight"] for row in grids[0]]] * 2
    for a, b in zip(*grids, strict=True):
        assert all(b[k] == pytest.approx(a[k], abs=2e-4) for k in a)  # means of 4 digits, 20 rows in 2 halves
    assert max_abs_diff(tmp_path / "one", tmp_path / "two") < ATOL


STOP_AFTER_STEP_2 = """
import os
import training.loop as loop

real_validate = loop.Checkpointer.validate


def validate_then_stop(self, state, *args, **kwargs):
    real_validate(self, state, *args, **kwargs)  # ends with a barrier: both ranks are past the write
    if state.step == 2:
        os._exit(1)  # killed at the first validation


loop.Checkpointer.validate = validate_then_stop
"""


@pytest.mark.slow
def test_sft_with_dropout_resumed_matches_uninterrupted(tiny_data_dir: Path, tmp_path: Path) -> None:
    args = ["sft", "--data", str(tiny_data_dir), "--preset", "tiny", "--max-steps", "4", "--batch-size", "64"]
    args += ["--lr", "0.01", "--eval-every", "2", "--hidden-dropout", "0.1", "--embed-dropout", "0.1"]
    whole, _ = torchrun(tmp_path, [*args, "--out", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr[-3000:]
    stopped, _ = torchrun(tmp_path, [*args, "--out", str(tmp_path / "cut")], before=STOP_AFTER_STEP_2)
    assert stopped.returncode != 0
    assert load_checkpoint(tmp_path / "cut.resume").trainer_state()["train_state"]["step"] == 2
    resumed, _ = torchrun(tmp_path, [*args, "--out", str(tmp_path / "cut"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # each step's masks come from (seed, rank, step): the resumed half draws what the whole run drew
    assert max_abs_diff(tmp_path / "whole.resume", tmp_path / "cut.resume") == 0.0


RL_CASES = {
    # 200 rows in global batches of 9: prompt shards of 4 and 5
    "grpo": ["--batch-size", "9", "--seed", "0"],
    # 201 rows (train + 1 valid row) in batches of 8; seed 138 puts the 1-row batch first (rank 1: stand-in)
    "vstar": "--batch-size 8 --seed 138 --train-splits train,valid --holdout 39 --value-warmup 2".split(),
    # the value loss also in the policy's loss: its backbone gradient goes through the policy's DDP module
    # (a vstar case names --value-warmup: the one-process config below reads 0 where the CLI's default is 200)
    "vstar_value_coef": "--batch-size 9 --seed 2 --value-warmup 2 --value-coef 1.0".split(),
}


@pytest.mark.slow
@pytest.mark.parametrize("case_name", sorted(RL_CASES))
def test_rl_two_processes_match_one(
    case_name: str, tiny_dataset: RecDataset, tiny_data_dir: Path, tmp_path: Path
) -> None:
    algo = case_name.split("_")[0]  # RL_CASES' keys: the algo, then what the case adds
    init = tmp_path / "init"
    train_sft(tiny_dataset, init, SFTConfig(preset="tiny", max_steps=2, batch_size=64, lr=1e-2), progress=False)
    case = dict(zip(RL_CASES[case_name][::2], RL_CASES[case_name][1::2], strict=True))
    config = RLConfig(
        algo=algo, max_steps=2, batch_size=int(case["--batch-size"]), num_candidates=16, lr=1e-2, eval_every=2,
        eval_limit=8, seed=int(case["--seed"]), train_splits=tuple(case.get("--train-splits", "train").split(",")),
        holdout=int(case.get("--holdout", 500)), value_warmup=int(case.get("--value-warmup", 0)),
        value_coef=float(case.get("--value-coef", 0.0)),
    )  # fmt: skip
    train_rl(tiny_dataset, init, tmp_path / "one", config, progress=False)
    one_steps = [json.loads(line) for line in (tmp_path / "one.steps.jsonl").read_text().splitlines()]
    assert all(s["nonzero_adv_share"] > 0 for s in one_steps), "no policy-gradient signal: the test would be vacuous"
    args = ["rl", "--data", str(tiny_data_dir), "--init", str(init), "--out", str(tmp_path / "two"), "--algo", algo]
    args += ["--max-steps", "2", "--num-candidates", "16", "--lr", "0.01", "--eval-every", "2", "--eval-limit", "8"]
    result, writes = torchrun(tmp_path, args + RL_CASES[case_name])
    assert result.returncode == 0, result.stderr[-3000:]
    assert_rank0_wrote(writes, tmp_path / "two", tmp_path / "two.resume")
    diff = max_abs_diff(tmp_path / "one.resume", tmp_path / "two.resume")
    moved = max_abs_diff(init, tmp_path / "two.resume")
    print(f"RL {case_name} 2 vs 1 process: max |param diff| {diff:.3g} (moved {moved:.3g} from init)")
    assert diff < ATOL and moved > 100 * ATOL
    if algo == "vstar":
        value_diff = max_abs_diff(tmp_path / "one.resume", tmp_path / "two.resume", "value_head")
        print(f"RL vstar value head: max |param diff| {value_diff:.3g}")
        assert value_diff < ATOL
    two_steps = [json.loads(line) for line in (tmp_path / "two.steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in two_steps] == [1, 2]
    for a, b in zip(one_steps, two_steps, strict=True):  # prompt-weighted means over ranks = one process's means
        assert a["reachability"] == pytest.approx(b["reachability"]) and a["distinct"] == pytest.approx(b["distinct"])
        assert a["sibling_tokens"] == pytest.approx(b["sibling_tokens"])  # a count over the batch: summed


# an error every rank hits: rank 0 reports it, and rank 1 is stopped by the launcher while it waits to report;
# a wait longer than the default 5 s keeps a loaded machine (rank 0 slower to start) from showing it twice
PATIENT_RANKS = "import vstar\nvstar.RANK_GRACE_S = 60.0\n"


@pytest.mark.slow
def test_global_batch_smaller_than_world_is_a_clear_error(tiny_data_dir: Path, tmp_path: Path) -> None:
    args = ["sft", "--data", str(tiny_data_dir), "--out", str(tmp_path / "x"), "--preset", "tiny", "--batch-size", "1"]
    result, writes = torchrun(tmp_path, args, before=PATIENT_RANKS)
    assert result.returncode != 0 and not writes
    assert result.stderr.count("--batch-size 1 is the global batch and must be >= the world size 2") == 1  # rank 0's
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_run_that_diverged_stops_with_its_error_on_every_rank(tiny_data_dir: Path, tmp_path: Path) -> None:
    # the validation of a model that scores no SID as finite: each rank's slice measures no HR@10 (None), which
    # the ranks' reduction took as a number (a TypeError on every rank, where one process names the divergence)
    args = ["sft", "--data", str(tiny_data_dir), "--out", str(tmp_path / "x"), "--preset", "tiny", "--seed", "3"]
    args += ["--max-steps", "6", "--batch-size", "16", "--lr", "1e30", "--eval-every", "1", "--eval-limit", "16"]
    result, writes = torchrun(tmp_path, args, before=PATIENT_RANKS)
    assert result.returncode != 0 and not writes
    diverged = "training diverged at step 1 (the model scored fewer than 10 SIDs as finite for each of 16 selection"
    assert result.stderr.count(diverged) == 1 and "[rank" not in result.stderr, result.stderr[-3000:]  # no trace


@pytest.mark.slow
def test_a_bad_option_is_one_error_not_one_per_rank(tiny_data_dir: Path, tmp_path: Path) -> None:
    args = ["sft", "--data", str(tiny_data_dir), "--out", str(tmp_path / "x"), "--bogus", "3"]
    result, _ = torchrun(tmp_path, args, before=PATIENT_RANKS)
    assert result.returncode != 0
    assert result.stderr.count("Error: No such option: --bogus") == 1, result.stderr[-3000:]


RANK_1_FAILS = """
import os
import training.sft.trainer as trainer


def fail_on_rank_1(*args, **kwargs):
    if os.environ["RANK"] == "1":
        raise ValueError("bad rows on rank 1 alone")


trainer.start_fresh = fail_on_rank_1
"""


@pytest.mark.slow
def test_an_error_on_one_rank_alone_is_reported_with_its_rank(tiny_data_dir: Path, tmp_path: Path) -> None:
    args = ["sft", "--data", str(tiny_data_dir), "--out", str(tmp_path / "x"), "--preset", "tiny", "--max-steps", "2"]
    result, _ = torchrun(tmp_path, args, before=RANK_1_FAILS)
    assert result.returncode != 0
    assert result.stderr.count("Error: rank 1: bad rows on rank 1 alone") == 1, result.stderr[-3000:]


def test_weighted_losses_give_the_global_gradient(tiny_dataset: RecDataset) -> None:
    """The scaling rule itself, simulated in one process: sum_r (W * n_r / N) * mean_r / W == global mean."""
    from models.policy import Policy
    from training.sft.batches import collate, encode_sample

    policy = Policy.from_preset("tiny", tiny_dataset.catalog, seed=0)
    rows = [encode_sample(policy, s) for s in tiny_dataset.splits["train"][:5]]
    pad = int(policy.tokenizer.pad_token_id)

    def grads(parts: list[list[tuple[list[int], list[int]]]]) -> list[torch.Tensor]:
        policy.model.zero_grad()
        total = sum(len(t) for part in parts for _, t in part)
        for part in parts:
            scale = len(parts) * sum(len(t) for _, t in part) / total
            (policy.model(**collate(part, pad)).loss * scale / len(parts)).backward()
        return [p.grad.clone() for p in policy.model.parameters()]

    whole, split = grads([rows]), grads([rows[:2], rows[2:]])
    assert max(float((a - b).abs().max()) for a, b in zip(whole, split, strict=True)) < 1e-6


SLOW_READS_ON_RANK_1 = """
import os
import time
import models.checkpoint as checkpoint

real_load, real_write = checkpoint.load_checkpoint, checkpoint.save_checkpoint


def record(event, path):
    with open(os.environ["VSTAR_TEST_WRITES"] + ".events", "a") as f:
        f.write(f"{time.time()} {os.environ['RANK']} {event} {path}\\n")


def slow_load(path, *args, **kwargs):
    if os.environ["RANK"] == "1":
        time.sleep(3)  # a slow reader (a large model, a busy file system)
    loaded = real_load(path, *args, **kwargs)
    record("read", path)
    return loaded


def timed_write(path, *args, **kwargs):
    record("write", path)
    return real_write(path, *args, **kwargs)


checkpoint.load_checkpoint, checkpoint.save_checkpoint = slow_load, timed_write
"""


@pytest.mark.slow
def test_a_given_fusion_weight_is_written_while_no_rank_reads_the_checkpoint(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    """With the weight given there is no choice (no collective) between the fusion's load of ``--out`` and rank
    0's rewrite of it: a rank other than 0 that read it then could find it mid-replace (missing, where the file
    system has no atomic swap). Only rank 0, which writes, reads it; the other ranks wait at the barrier."""
    out = tmp_path / "x"
    args = ["sft", "--data", str(tiny_data_dir), "--out", str(out), "--preset", "tiny", "--max-steps", "1"]
    args += ["--batch-size", "64", "--fusion-weight", "1"]
    result, _ = torchrun(tmp_path, args, before=SLOW_READS_ON_RANK_1)
    assert result.returncode == 0, result.stderr[-3000:]
    events = [line.split() for line in (tmp_path / "writes.txt.events").read_text().splitlines()]
    last_write = max(float(t) for t, rank, what, path in events if what == "write" and path == str(out))
    reads = [(float(t), rank) for t, rank, what, path in events if what == "read" and path == str(out)]
    assert all(t < last_write for t, _ in reads), events
    assert load_checkpoint(out).manifest["fusion"]["weight"] == 1.0
