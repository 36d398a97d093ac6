"""The ``vstar`` command's contract with a user: one-line errors, options checked first, help for every option.

Simple mistakes run in a subprocess where importing torch or transformers
fails, so a test passes only if the mistake is reported before either loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from models.checkpoint import save_checkpoint
from models.policy import Policy
from tests.conftest import make_catalog, write_random_dataset
from training.cli.options import check_run_outputs
from training.data.dataset import parse_splits
from training.rl.config import RLConfig
from vstar import app, raised_by_project

REPO = Path(__file__).resolve().parents[1]
# `vstar ARGS` with torch and transformers unimportable (None in sys.modules makes `import` raise)
WITHOUT_TORCH = "import sys; sys.modules['torch'] = sys.modules['transformers'] = None; import vstar; vstar.main()"


def assert_one_line_error(exit_code: int, output: str, message: str) -> None:
    lines = output.strip().splitlines()
    assert exit_code == 2, output
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], output
    assert "Traceback" not in output


def last_error_line(exit_code: int, output: str) -> str:
    """The line a failed command ended with, after what loading printed (transformers' weight-loading bar)."""
    assert exit_code == 2 and "Traceback" not in output, output
    return output.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def bad_data(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny data set with valid.csv's line 6 replaced by `hello,world`."""
    out = tmp_path_factory.mktemp("bad") / "data"
    out.mkdir()
    for f in tiny_data_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    lines = (out / "valid.csv").read_text().splitlines(keepends=True)
    lines[5] = "hello,world\n"
    (out / "valid.csv").write_text("".join(lines))
    return out


def simple_mistakes(data: Path, bad: Path, tmp: Path) -> Iterator[tuple[list[str], str]]:
    (tmp / "empty").mkdir(exist_ok=True)
    d, out, gone, empty = str(data), str(tmp / "out"), str(tmp / "gone"), str(tmp / "empty")
    yield ["sft", "--data", d, "--out", out, "--preset", "huge"], "'huge' is not one of 'tiny', 'small'"
    yield ["sft", "--data", d, "--out", out, "--precision", "fp16"], "'fp16' is not one of"
    yield ["sft", "--data", d, "--out", out, "--crop-prob", "0.9", "--last-item-prob", "0.5"], "last_item_prob must be"
    yield ["sft", "--out", out], "--data DIR (or --minionerec-root DIR --dataset NAME) is required"
    yield ["sft", "--data", d, "--out", out, "--resume"], f"--resume: no interrupted run at {out}: nothing to continue"
    yield (
        ["sft", "--data", d, "--out", out, "--refit", "--train-splits", "train"],
        "--refit trains again on all of train + valid after a run that held valid rows out: it needs valid",
    )
    yield ["sft", "--data", str(bad), "--out", out, "--preset", "tiny"], "valid.csv:6: 2 columns, the header has 7"
    yield ["eval", "--data", d, "--checkpoint", gone], f"{gone} does not exist"
    yield ["eval", "--data", d, "--checkpoint", empty], f"{empty} is not a checkpoint folder (no manifest.json)"
    yield ["eval", "--data", d, "--checkpoint", empty, "--decoder", "greedy"], "'greedy' is not one of 'beam', 'ved'"
    yield ["eval", "--data", d, "--checkpoint", empty, "--split", "dev"], "'dev' is not one of"
    yield ["eval", "--data", d, "--checkpoint", empty, "--explore-slots", "0"], "--explore-slots is a VED option, which"
    yield (
        ["eval", "--data", d, "--checkpoint", empty, "--budget", "60", "--explore-slots", "1"],
        "--budget, --explore-slots are VED options, which beam search would ignore: use with --decoder ved",
    )
    yield ["eval", "--data", d, "--checkpoint", empty, "--train-splits", "train,test"], "no model trains on test"
    yield ["fuse", "--data", d, "--checkpoint", gone], "does not exist"
    yield ["rl", "--data", d, "--init", gone, "--out", out], "Invalid value for --init"
    yield ["rl", "--data", d, "--init", empty, "--out", out, "--algo", "ppo"], "'ppo' is not one of 'grpo', 'vstar'"
    yield (
        ["rl", "--data", d, "--init", empty, "--out", out, "--level-weights", "0.3,x"],
        "a comma list of finite numbers",
    )
    rl = ["rl", "--data", d, "--init", empty, "--out", out]
    yield [*rl, "--explore-slots", "4"], "--explore-slots is a V-STAR option, which --algo grpo would ignore"
    yield (
        [*rl, "--value-warmup", "0", "--w-sib", "1", "--sibling-norm", "siblings", "--value-lr", "1", "--algo", "grpo"],
        "--value-lr, --w-sib, --sibling-norm, --value-warmup are V-STAR options, which --algo grpo would ignore",
    )
    yield [*rl, "--algo", "vstar", "--no-sibling", "--w-sib", "2"], "--w-sib is read by Sibling-GRPO alone, which"
    yield [*rl, "--algo", "vstar", "--no-ved", "--explore-slots", "1"], "--explore-slots is read by VED alone, which"
    yield ["diagnose", "--data", d, "--checkpoint", gone], "does not exist"
    yield ["baseline", "knn", "--data", d], "'knn' is not one of 'pop', 'transition', 'sasrec'"
    yield ["bench", "decode", "--beams", "10,x"], "expected a comma list of positive integers"
    yield ["rl", "--data", d, "--init", empty, "--out", out, "--beta", "inf"], "'--beta': inf is not a finite number"
    yield ["fuse", "--data", d, "--checkpoint", gone, "--weights", "3,nan"], "a comma list of finite numbers"
    yield ["baseline", "sasrec", "--data", d, "--lr", "nan"], "'--lr': nan is not a finite number"
    # nan fails typer's bound (min=0) before the check above sees it: named as what it is all the same
    yield ["rl", "--data", d, "--init", empty, "--out", out, "--beta", "nan"], "'--beta': nan is not a finite number"
    yield ["eval", "--data", d, "--checkpoint", empty, "--fusion-weight", "-inf"], "'--fusion-weight': -inf is not a"
    yield ["rl", "--data", d, "--init", empty, "--out", out, "--lr", "-1"], "'--lr': Input should be greater than or"
    yield ["sft", "--data", d, "--out", out, "--base-model", gone], f"{gone} is not a local model folder (no config"
    yield ["diagnose", "--data", d, "--checkpoint", empty], f"{empty} is not a checkpoint folder"
    yield ["plot", empty, "--out", str(tmp / "curves")], "the figure is a PNG; give a path ending in .png"
    yield (
        ["rl", "--data", d, "--init", empty, "--out", out, "--tensorboard", str(data / "index.json")],
        "is a file, not a",
    )
    yield ["bench", "decode", "--batches", "1,0"], "expected a comma list of positive integers, got '1,0'"
    # an empty entry was dropped: --weights 1,,2 chose among two weights, --level-weights 1,,0.5,0.2 read as three
    yield ["fuse", "--data", d, "--checkpoint", gone, "--weights", "1,,2"], "--weights: entry 2 of '1,,2' is empty"
    yield [*rl, "--level-weights", "0.3,0.3,"], "--level-weights: entry 3 of '0.3,0.3,' is empty"
    yield ["bench", "serve", "--checkpoint", empty, "--clients", "4,,8"], "--clients: entry 2 of '4,,8' is empty"
    # HF generate refused it after the model had loaded and our decoder had run: an error naming no option
    yield ["bench", "decode", "--beams", "10,1"], "--beams 1: the reference, HF generate, needs K >= 2"
    yield ["embed", "--data", d, "--encoder", gone], f"{gone} is not a local model folder (no config"
    (tmp / "encoder").mkdir(exist_ok=True)
    (tmp / "encoder" / "config.json").write_text("{}")
    encoder = str(tmp / "encoder")
    yield ["embed", "--data", d, "--encoder", encoder, "--pooling", "max"], "'max' is not one of 'mean', 'cls', 'last'"
    yield ["embed", "--data", empty, "--encoder", encoder], f"{empty}/item.json: file not found"
    yield ["embed", "--data", d, "--encoder", encoder], f"{d}/item_emb.npy exists"
    logs = ["import", "--events", f"{d}/train.csv", "--items", f"{gone}.csv"]
    yield [*logs, "--out", out], f"{gone}.csv: file not found"
    yield [*logs, "--out", out, "--split", "0.5,0.5"], "--split must be three numbers (train, valid, test)"
    yield [*logs, "--out", d, "--force"], f"{d} holds files that vstar import did not write"


def test_simple_mistakes_are_one_line_before_torch_loads(tiny_data_dir: Path, bad_data: Path, tmp_path: Path) -> None:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    for args, message in simple_mistakes(tiny_data_dir, bad_data, tmp_path):
        proc = subprocess.run(
            [sys.executable, "-c", WITHOUT_TORCH, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
        )
        assert proc.stdout == "", (args, proc.stdout)
        assert "Value error" not in proc.stderr, (args, proc.stderr)  # pydantic's label, not the reason
        assert_one_line_error(proc.returncode, proc.stderr, message)
    assert not (tmp_path / "out").exists()


def test_outputs_that_would_destroy_something_are_refused_before_any_work(tiny_data_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for f in tiny_data_dir.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    project = tmp_path / "project"
    (project / "notes").mkdir(parents=True)
    (project / "notes" / "a.txt").write_text("mine")
    note = tmp_path / "note.txt"
    note.write_text("mine")
    init = tmp_path / "init"
    init.mkdir()
    (init / "manifest.json").write_text("{}")
    before = {p: p.read_bytes() for p in [*data.iterdir(), project / "notes" / "a.txt", note, init / "manifest.json"]}
    d, tiny = str(data), ["--preset", "tiny", "--max-steps", "1"]
    rl = ["rl", "--data", d, "--init", str(init), "--out", str(tmp_path / "rl")]
    sft = ["sft", "--data", d, "--out", str(tmp_path / "ck"), "--preset", "tiny", "--max-steps", "1"]
    mistakes = [
        (["sft", "--data", d, "--out", d, *tiny], f"{data} is a folder that is not a checkpoint (no manifest.json)"),
        (["sft", "--data", d, "--out", str(project), *tiny], "is a folder that is not a checkpoint"),
        (["sft", "--data", d, "--out", str(note), *tiny], f"{note} is a file, not a checkpoint folder"),
        (["sft", "--data", d, "--out", str(tmp_path / "ck"), "--json", str(project), *tiny], "is a folder: give"),
        (["rl", "--data", d, "--init", str(init), "--out", str(init)], "is the --init checkpoint"),
        (["rl", "--data", d, "--init", str(init), "--out", d], "is a folder that is not a checkpoint"),
        (["eval", "--data", d, "--checkpoint", str(init), "--json", f"{note}/m.json"], f"{note} is a file, so"),
        (["diagnose", "--data", d, "--checkpoint", str(init), "--json", str(data)], "is a folder: give"),
        (["diagnose", "--data", d, "--checkpoint", str(init), "--explore-slots", "2"], "use them with --decoder ved"),
        # a report written into a data set or a checkpoint could replace one of their files
        (["eval", "--data", d, "--checkpoint", str(init), "--json", f"{d}/test.csv"], "a data set (it holds a SID"),
        (["eval", "--data", d, "--checkpoint", str(init), "--json", f"{init}/manifest.json"], "a checkpoint (it holds"),
        (["rl", "--data", d, "--init", str(init), "--out", str(tmp_path / "rl"), "--json", f"{init}/s.json"], "inside"),
        (["baseline", "pop", "--data", d, "--json", f"{d}/pop.json"], f"is inside {data}, a data set"),
        (["compare", "--base", str(note), "--other", str(note), "--json", str(note)], "is one of --base's eval JSON"),
        # the curves' folder at the summary's path, or at the steps log's: the run trained to its end and failed there
        ([*rl, "--json", f"{tmp_path}/x", "--tensorboard", f"{tmp_path}/x"], f"{tmp_path}/x is the --json file"),
        ([*sft, "--json", f"{tmp_path}/x", "--tensorboard", f"{tmp_path}/x/tb"], "lies inside the --json file"),
        ([*rl, "--tensorboard", f"{tmp_path}/rl.steps.jsonl"], f"{tmp_path}/rl.steps.jsonl is {tmp_path}/rl.steps"),
        (["compare", "--base", f"{note},,{note}", "--other", str(note)], f"--base: entry 2 of '{note},,{note}' is"),
        (["sft", "--data", d, "--out", str(tmp_path / "ck"), "--seed", "-1", *tiny], "'--seed': Input should be"),
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    for args, message in mistakes:
        proc = subprocess.run(
            [sys.executable, "-c", WITHOUT_TORCH, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
        )
        assert_one_line_error(proc.returncode, proc.stderr, message)
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "init", "note.txt", "project"]


def test_a_corrupt_checkpoint_is_one_line(tiny_data_dir: Path, tiny_policy: Policy, tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny_policy)
    (ckpt / "manifest.json").write_text('{"format_version": 1, "prompt": ')
    result = CliRunner().invoke(app, ["eval", "--data", str(tiny_data_dir), "--checkpoint", str(ckpt)])
    assert_one_line_error(result.exit_code, result.output, "manifest.json is not valid JSON")


def test_bench_decode_refuses_beams_wider_than_the_catalog(tiny_policy: Policy, tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny_policy)
    sids = len(tiny_policy.catalog.sids)
    result = CliRunner().invoke(app, ["bench", "decode", "--checkpoint", str(ckpt), "--beams", f"5,{sids + 1}"])
    last = last_error_line(result.exit_code, result.output)
    assert f"--beams {sids + 1} is more than the {sids} SIDs of the catalog; give at most {sids}" in last, last


def test_eval_runs_beams_wider_than_the_catalog_as_wide_as_the_catalog_and_says_so(
    tiny_data_dir: Path, tiny_policy: Policy, tmp_path: Path
) -> None:
    """Its JSON said ``"beams": N`` for lists that held the whole catalog; the service answers a k above the
    catalog with every SID too, so eval runs the catalog's width (its default, 50, may be above a small catalog)."""
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny_policy)
    sids = len(tiny_policy.catalog.sids)
    reports = {}
    for beams in (sids, sids + 1):
        out = tmp_path / f"b{beams}.json"
        args = ["eval", "--data", str(tiny_data_dir), "--checkpoint", str(ckpt), "--limit", "4", "--beams", str(beams)]
        result = CliRunner().invoke(app, [*args, "--json", str(out)])
        assert result.exit_code == 0, result.output[-3000:]
        reports[beams] = json.loads(out.read_text()), result.output
    (asked, output), (exact, _) = reports[sids + 1], reports[sids]
    note = f"--beams {sids + 1} is more than the {sids} SIDs of the catalog: ran {sids}, lists of every SID"
    assert asked["beams"] == sids and asked["beams_note"] == note and f"note: {note}" in output
    assert exact["beams"] == sids and exact["beams_note"] is None
    assert asked["metrics"] == exact["metrics"] and asked["target_ranks"] == exact["target_ranks"]


@pytest.mark.parametrize("command", ["eval", "diagnose"])
def test_a_checkpoint_of_another_catalog_is_refused(tiny_policy: Policy, tmp_path: Path, command: str) -> None:
    other = write_random_dataset(tmp_path / "other", make_catalog(seed=7))  # the same size, other SIDs
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny_policy)
    result = CliRunner().invoke(app, [command, "--data", str(other), "--checkpoint", str(ckpt), "--limit", "2"])
    last = last_error_line(result.exit_code, result.output)
    assert last == "Error: --checkpoint: the checkpoint was trained on another catalog than other: its SIDs differ"


def test_an_empty_split_is_an_error_not_a_score_of_zero(
    tiny_data_dir: Path, tiny_policy: Policy, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for f in tiny_data_dir.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    (data / "test.csv").write_text((data / "test.csv").read_text().splitlines()[0] + "\n")  # the header alone
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny_policy)
    for args in (["eval", "--checkpoint", str(ckpt)], ["baseline", "pop"]):
        result = CliRunner().invoke(app, [*args, "--data", str(data)])
        last = last_error_line(result.exit_code, result.output)
        assert last.startswith("Error: ") and "the test split of data has no rows to score" in last, result.output


@pytest.mark.parametrize("command", ["eval", "diagnose"])
def test_a_holdout_beyond_the_split_is_refused_before_the_checkpoint_loads(
    tiny_data_dir: Path, tmp_path: Path, command: str
) -> None:
    ckpt = tmp_path / "ckpt"  # a manifest alone: the refusal comes before the checkpoint loads
    ckpt.mkdir()
    (ckpt / "manifest.json").write_text("{}")
    args = [command, "--data", str(tiny_data_dir), "--checkpoint", str(ckpt), "--split", "valid", "--holdout", "41"]
    result = CliRunner().invoke(app, args)
    assert_one_line_error(result.exit_code, result.output, "--holdout 41 is more than the 40 rows of the valid split")


def test_a_device_this_machine_lacks_is_one_line(tiny_data_dir: Path, tmp_path: Path) -> None:
    import torch

    mistakes = {"bogus": "'bogus' is not a torch device", "meta": "the models run on cpu, cuda"}
    if not torch.cuda.is_available():
        mistakes["cuda"] = "cuda: no CUDA device here"
    else:
        mistakes[f"cuda:{torch.cuda.device_count()}"] = f"this machine has {torch.cuda.device_count()} CUDA device"
    for device, message in mistakes.items():
        out = str(tmp_path / "ck")
        for args in (["eval", "--checkpoint", out], ["sft", "--out", out, "--preset", "tiny"]):
            result = CliRunner().invoke(app, [*args, "--data", str(tiny_data_dir), "--device", device])
            assert_one_line_error(result.exit_code, result.output, message)


def test_a_value_error_inside_a_library_is_a_bug_and_keeps_its_traceback() -> None:
    from training.data.dataset import parse_splits

    with pytest.raises(ValueError) as ours:
        parse_splits("train,dev")
    with pytest.raises(ValueError) as library:
        json.loads("{")
    assert raised_by_project(ours.value) and not raised_by_project(library.value)


@pytest.mark.parametrize(
    "error",
    [
        MemoryError("Unable to allocate 745. GiB for an array with shape (99999999946,) and data type float64"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
            "allocate 40000000000000 bytes. Error code 12 (Cannot allocate memory)"
        ),  # fmt: skip
        type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried to allocate 20.00 GiB"),
    ],
)
def test_running_out_of_memory_is_one_line_that_says_what_was_asked_for(
    error: Exception, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.data.synth

    def fails(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(training.data.synth, "write_synth", fails)
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "d"), "--items", "100000000000"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.startswith(f"Error: out of memory: {error}: ask for less") and result.output.count("\n") == 1


def test_a_file_the_system_will_not_write_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.data.synth

    def fails(*args: object, **kwargs: object) -> None:  # /sys passes the checks before the work (root may write)
        raise PermissionError(1, "Operation not permitted", "/sys/x")

    monkeypatch.setattr(training.data.synth, "write_synth", fails)
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "d")])
    assert result.exit_code == 1 and result.output == "Error: /sys/x: Operation not permitted\n"


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (MemoryError(), "Error: out of memory: an allocation failed: ask for less (sizes, --batch-size)"),  # Python's
        (
            OSError(28, "No space left on device"),
            "Error: No space left on device: free some space, or write the output elsewhere",
        ),  # a write() on a full disk names no file  # fmt: skip
        (
            OSError(27, "File too large"),
            "Error: File too large: raise the file-size limit (ulimit -f), or write the output elsewhere",
        ),  # nor one past the file-size limit  # fmt: skip
    ],
)
def test_errors_that_name_nothing_still_say_what_happened(
    error: Exception, line: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.data.synth

    def fails(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(training.data.synth, "write_synth", fails)
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "d")])
    assert result.exit_code == 1 and result.output == line + "\n"


def test_ctrl_c_is_one_line_and_status_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """typer turns Ctrl-C into exit status 130 without a word, so a terminal showed a progress bar cut short and
    nothing else; the status stays (the demo stops on it), and one line says what happened."""
    import training.data.synth

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(training.data.synth, "write_synth", interrupted)
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "d")])
    assert result.exit_code == 130 and result.output == "Error: interrupted (Ctrl-C)\n", result.output


def test_any_other_runtime_error_is_a_bug_and_keeps_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.data.synth

    def fails(*args: object, **kwargs: object) -> None:
        raise RuntimeError("expected all tensors to be on the same device")

    monkeypatch.setattr(training.data.synth, "write_synth", fails)
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "d")])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


def commands(cmd: typer.core.TyperGroup, path: str = "vstar") -> Iterator[tuple[str, typer.core.TyperCommand]]:
    for name, sub in cmd.commands.items():
        if isinstance(sub, typer.core.TyperGroup):
            yield from commands(sub, f"{path} {name}")
        else:
            yield f"{path} {name}", sub


def test_every_option_has_help_and_flags_look_like_flags() -> None:
    found = dict(commands(typer.main.get_command(app)))
    assert {"vstar sft", "vstar eval", "vstar rl", "vstar demo", "vstar bench decode", "vstar plot"} <= set(found)
    for path, cmd in found.items():
        for param in cmd.params:
            if isinstance(param, typer.core.TyperOption):
                assert param.help, f"{path} {param.opts[0]} has no help text"
        text = CliRunner().invoke(app, [*path.split()[1:], "--help"], terminal_width=200).output
        assert "<bool>" not in text, f"{path} --help shows a flag as taking a value"
    sft_help = CliRunner().invoke(app, ["sft", "--help"], terminal_width=200).output
    assert "--resume " in sft_help and "--text-init / --no-text-init" in sft_help
    assert "--precision <auto|fp32|bf16>" in sft_help and "[recipe: 20; else 10]" in sft_help
    assert "--decoder <beam|ved>" in CliRunner().invoke(app, ["eval", "--help"]).output


def option_help(path: str, flag: str) -> str:
    cmd = dict(commands(typer.main.get_command(app)))[path]
    return next(p.help for p in cmd.params if flag in p.opts and p.help)


def test_shared_options_say_what_they_do_in_each_command() -> None:
    for path in ("vstar sft", "vstar rl"):  # --max-steps sets the length in place of --epochs there
        assert "in place of --epochs" in option_help(path, "--max-steps")
    assert "or when --epochs end first" in option_help("vstar baseline", "--max-steps")  # SASRec: a cap
    eval_splits = option_help("vstar eval", "--train-splits")
    assert "long tail of tail_share@10" in eval_splits and "to train on" not in eval_splits
    assert "learns from" in option_help("vstar baseline", "--train-splits")
    assert option_help("vstar compare", "--seed") == "Seed for the bootstrap's draws of rows."
    assert option_help("vstar diagnose", "--seed") == "Seed for VED's random draws (beam search draws nothing)."


def test_rl_option_defaults_are_rlconfigs() -> None:
    """``vstar rl`` writes its defaults out (the CLI may not import torch to read them); they must be RLConfig's."""
    cmd = typer.main.get_command(app).commands["rl"]
    config = {f.name: f.default for f in dataclasses.fields(RLConfig) if f.default is not dataclasses.MISSING}
    shared = {p.name: p.default for p in cmd.params if p.name in config and p.default is not None}
    assert {"beta", "lr", "value_lr", "w_sib", "batch_size", "num_candidates", "holdout"} <= set(shared)
    shared["train_splits"] = tuple(parse_splits(shared["train_splits"]))  # a comma list, parsed as vstar rl does
    assert shared == {name: config[name] for name in shared}


def test_a_fresh_run_onto_an_earlier_ones_files_is_refused_before_any_work(tiny_data_dir: Path, tmp_path: Path) -> None:
    """An earlier run's checkpoint or side files at --out are kept unless --resume or --force says what to do."""
    init = tmp_path / "init"
    init.mkdir()
    (init / "manifest.json").write_text("{}")
    runs = {"ck": "ck/manifest.json", "h": "h.heldout/manifest.json", "r": "r.resume/manifest.json",
            "s": "s.steps.jsonl", "t": "t.tb/events.out.tfevents.0"}  # fmt: skip
    for name in runs.values():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    d, tiny = str(tiny_data_dir), ["--preset", "tiny", "--max-steps", "1"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    mistakes = [
        (["sft", "--data", d, "--out", str(tmp_path / "ck"), *tiny], f"{tmp_path / 'ck'} holds an earlier run's"),
        (["sft", "--data", d, "--out", str(tmp_path / "h"), *tiny], f"{tmp_path / 'h.heldout'} exists, from an"),
        (["rl", "--data", d, "--init", str(init), "--out", str(tmp_path / "r")], "r.resume exists, from an earlier"),
        (["rl", "--data", d, "--init", str(init), "--out", str(tmp_path / "s")], "s.steps.jsonl exists, from an"),
        (["sft", "--data", d, "--out", str(tmp_path / "t"), *tiny], "t.tb exists, from an earlier run"),
        (["sft", "--data", d, "--out", str(tmp_path / "ck"), "--resume", "--force", *tiny], "give one of them"),
        # killed before its first saved state: --resume has nothing to continue, so it is not offered
        (["rl", "--data", d, "--init", str(init), "--out", str(tmp_path / "t"), "--resume"], "t.tb is left by a run"),
    ]
    for args, message in mistakes:
        proc = subprocess.run(
            [sys.executable, "-c", WITHOUT_TORCH, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
        )
        assert_one_line_error(proc.returncode, proc.stderr, message)
        if "--force" in args:
            continue
        if "--resume" in args:
            assert (
                "nothing to continue" in proc.stderr and "saved no state to resume: --force starts again" in proc.stderr
            )
        elif args[args.index("--out") + 1].endswith(("/r", "/h")):  # a state to continue
            assert "--resume continues it, --force replaces it" in proc.stderr
        else:
            assert "it saved no state to resume: --force replaces it" in proc.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_outputs_inside_the_runs_own_folders_or_the_data_are_refused(tiny_data_dir: Path, tmp_path: Path) -> None:
    """--json or --tensorboard where the checkpoint swap replaces them (the run would train, then fail or lose
    them), or in the data folder, as --out (it wrote <out>, <out>.resume and <out>.tb among the data files); and
    an --init that is one of --out's own folders (which the run replaces)."""
    ck, d, tiny = tmp_path / "ck", str(tiny_data_dir), ["--preset", "tiny", "--max-steps", "1"]
    data_files = sorted(p.name for p in tiny_data_dir.iterdir())
    init = tmp_path / "x.resume"
    init.mkdir()
    (init / "manifest.json").write_text("{}")
    (tmp_path / "x.heldout").mkdir()
    (tmp_path / "x.heldout" / "manifest.json").write_text("{}")
    sft = ["sft", "--data", d, "--out", str(ck), *tiny]
    mistakes = [
        ([*sft, "--json", str(ck)], f"--json: {ck} is the --out checkpoint folder, which the run at --out"),
        ([*sft, "--json", str(ck / "s.json")], f"{ck / 's.json'} lies inside the --out checkpoint folder, which"),
        ([*sft, "--json", str(tmp_path / "ck.resume" / "s.json")], "lies inside"),
        ([*sft, "--tensorboard", str(ck)], f"--tensorboard: {ck} is the --out checkpoint folder"),
        ([*sft, "--tensorboard", str(tmp_path / "ck.heldout")], "ck.heldout, which the run at --out"),
        ([*sft, "--tensorboard", d], f"--tensorboard: {d} is the data folder: give a path outside it"),
        ([*sft, "--tensorboard", f"{d}/tb"], f"lies inside the data folder {d}"),
        (["sft", "--data", d, "--out", f"{d}/ck", *tiny], f"{d}/ck lies inside {d}, a data set (it holds a SID"),
        # a checkpoint's own writes (vstar fuse, a resumed run) replace it whole, with a run inside it
        (
            ["rl", "--data", d, "--init", str(init), "--out", f"{init}/rl"],
            f"{init}/rl lies inside {init}, a checkpoint ",
        ),
        (["rl", "--data", d, "--init", str(init), "--out", str(tmp_path / "x")], f"--init checkpoint {init} is one of"),
        (["rl", "--data", d, "--init", str(tmp_path / "x.heldout"), "--out", str(tmp_path / "x")], "writes over"),
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    for args, message in mistakes:
        proc = subprocess.run(
            [sys.executable, "-c", WITHOUT_TORCH, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
        )
        assert_one_line_error(proc.returncode, proc.stderr, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.heldout", "x.resume"]
    assert sorted(p.name for p in tiny_data_dir.iterdir()) == data_files


def test_a_command_that_runs_in_one_process_is_refused_under_a_launcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun every process would run it whole and write the same files at once: only sft and rl train
    across processes. With one process (WORLD_SIZE 1) it runs."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for command in (["fuse", "--data", "x", "--checkpoint", "y"], ["eval", "--help"], ["bench", "decode"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        assert f"vstar {command[0]} runs in one process: launch it without torchrun" in result.output
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert CliRunner().invoke(app, ["eval", "--help"]).exit_code == 0


@pytest.mark.parametrize(
    ("sids", "given", "message"),
    [
        (
            5,
            5,
            "--num-candidates 5 is not fewer than the 5 SIDs of x's catalog: a group would be the whole catalog, "
            "its target always reached; give at most 4",
        ),
        (2, 2, "RL needs a catalog of at least 3 SIDs"),  # G is at least 2: "give at most 1" could not be followed
    ],
)
def test_rl_groups_smaller_than_the_catalog(sids: int, given: int, message: str) -> None:
    from types import SimpleNamespace

    from training.cli.options import require_candidates

    data = SimpleNamespace(name="x", catalog=SimpleNamespace(sids=[("a",)] * sids))
    with pytest.raises(typer.BadParameter, match=re.escape(message)):
        require_candidates(given, data)
    if sids > 2:
        require_candidates(sids - 1, data)  # one fewer: accepted


def test_resume_finds_a_state_a_killed_save_set_aside(tmp_path: Path) -> None:
    """Where the file system cannot swap folders, a save killed between its two renames leaves <out>.resume set
    aside under a hidden name: --resume puts it back instead of saying there is nothing to continue (and --force,
    the next thing a user would try, would have deleted it)."""
    out = tmp_path / "rl"
    aside = tmp_path / ".rl.resume.old-1234abcd"
    aside.mkdir()
    (aside / "manifest.json").write_text("{}")
    check_run_outputs(out, None, None, [], resume=True, force=False)
    assert (tmp_path / "rl.resume" / "manifest.json").is_file() and not aside.exists()
