"""A corrupt checkpoint ends every command that reads one with one line naming the file, never a traceback.

The files are damaged the two ways a real incident does it: cut short (a copy or
a disk that filled up) and overwritten at the front.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.policy import Policy
from models.value_head import value_head_for
from tests.service.conftest import free_port
from vstar import app

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vstar_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_policy: Policy) -> Path:
    """A checkpoint with a value head and a resume state, as ``vstar rl --algo vstar`` writes."""
    head = value_head_for(tiny_policy)
    manifest = {"stage": "sft", "value_head": asdict(head.config)}
    out = tmp_path_factory.mktemp("corrupt") / "ck"
    return save_checkpoint(out, tiny_policy, manifest, {"value_head": head.state_dict()}, trainer_state={"step": 1})


def damaged(source: Path, dest: Path, name: str, how: str) -> Path:
    shutil.copytree(source, dest)
    f = dest / name
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if how == "cut" else b"\x00" * 64 + data[64:])
    return dest


@pytest.mark.parametrize("how", ["cut", "overwritten"])
@pytest.mark.parametrize("name", ["model.safetensors", "value_head.safetensors"])
def test_load_names_the_corrupt_file(vstar_checkpoint: Path, tmp_path: Path, name: str, how: str) -> None:
    path = damaged(vstar_checkpoint, tmp_path / "ck", name, how)
    with pytest.raises(CheckpointError, match=rf"^checkpoint {path}: {name} is corrupt: [^\n]+$"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", ["model.safetensors", "value_head.safetensors"])
def test_weights_that_hold_nan_or_inf_are_named(vstar_checkpoint: Path, tmp_path: Path, name: str) -> None:
    # the safetensors file is whole and well-formed; one value in it is not a number (a run that diverged)
    from safetensors.torch import load_file, save_file

    path = tmp_path / "ck"
    shutil.copytree(vstar_checkpoint, path)
    tensors = load_file(str(path / name))
    first = sorted(k for k, t in tensors.items() if t.is_floating_point())[0]
    tensors[first].view(-1)[0] = float("nan")
    save_file(tensors, str(path / name), metadata={"format": "pt"})
    stem = name.removesuffix(".safetensors")
    where = first if stem == "model" else f"{stem}.{first}"  # the model's tensors by their parameter names
    with pytest.raises(CheckpointError, match=rf"^checkpoint {path}: {where} holds nan or inf"):
        load_checkpoint(path)


UP_PROJ = "model.layers.1.mlp.up_proj.weight"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ("drop", rf"{UP_PROJ} is missing"),  # transformers gave it fresh random weights, with a warning
        ("add", r"bogus.weight is not the model's"),  # the model of config.json has no place for it: dropped
        ("reshape", rf"{UP_PROJ} is \(64, 5\), the model's \(64, 32\)"),  # transformers raised a bare RuntimeError
    ],
)
def test_weights_that_do_not_fit_the_models_config_are_named(
    vstar_checkpoint: Path, tmp_path: Path, change: str, problem: str
) -> None:
    # a whole, well-formed model.safetensors of another model's tensors (a copied file, another writer)
    from safetensors.torch import load_file, save_file

    path = tmp_path / "ck"
    shutil.copytree(vstar_checkpoint, path)
    tensors = load_file(str(path / "model.safetensors"))
    if change == "drop":
        del tensors[UP_PROJ]
    elif change == "add":
        tensors["bogus.weight"] = torch.zeros(2)
    else:
        tensors[UP_PROJ] = tensors[UP_PROJ][:, :5].contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"^checkpoint {path}: its weights do not fit config.json: {problem}$"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "config.json", "catalog.json"])
def test_a_missing_file_is_named(vstar_checkpoint: Path, tmp_path: Path, name: str) -> None:
    path = tmp_path / "ck"
    shutil.copytree(vstar_checkpoint, path)
    (path / name).unlink()
    with pytest.raises(CheckpointError, match=rf"^checkpoint {path} is incomplete: {name} is missing$"):
        load_checkpoint(path)


@pytest.mark.parametrize("how", ["cut", "overwritten", "replaced"])
def test_corrupt_resume_state_is_named(vstar_checkpoint: Path, tmp_path: Path, how: str) -> None:
    """Damage is called corrupt, not a file that holds objects vstar never writes (the weights-only unpickler
    words both as "Weights only load failed": bytes that are no pickle are an "Unsupported operand")."""
    if how == "replaced":
        path = tmp_path / "ck"
        shutil.copytree(vstar_checkpoint, path)
        (path / "trainer_state.pt").write_text("overwritten by something else")
    else:
        path = damaged(vstar_checkpoint, tmp_path / "ck", "trainer_state.pt", how)
    with pytest.raises(CheckpointError, match=r"trainer_state.pt is corrupt: [^\n]+$"):
        load_checkpoint(path).trainer_state()


def test_a_resume_state_damaged_inside_its_tensors_is_named(tiny_policy: Policy, tmp_path: Path) -> None:
    """Bytes changed inside a tensor's data unpickle fine (other numbers: a resume would train on from a state
    it never wrote); the archive's CRC of that entry fails, and the error names it."""
    path = save_checkpoint(tmp_path / "ck", tiny_policy, {}, trainer_state={"moments": torch.zeros(4096)})
    state_file = path / "trainer_state.pt"
    with zipfile.ZipFile(state_file) as archive:
        entry = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    data = bytearray(state_file.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[entry.header_offset + 26 : entry.header_offset + 30])
    start = entry.header_offset + 30 + name_len + extra_len  # where the local header ends and the data begins
    data[start + 100 : start + 116] = b"\x7f" * 16  # 4 float32s inside the tensor turned to about 3.4e38
    state_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"trainer_state.pt is corrupt: its entry {entry.filename} fails"):
        load_checkpoint(path).trainer_state()


class RunsCode:
    """What a hostile trainer_state.pt could hold: unpickling it would call os.system to create ``mark``."""

    def __init__(self, mark: Path) -> None:
        self.mark = mark

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.mark}",))


def test_a_resume_state_that_would_run_code_is_refused_unrun(vstar_checkpoint: Path, tmp_path: Path) -> None:
    """The trainer state is read with torch's weights-only unpickler: a pickled call is named, never made."""
    path, mark = tmp_path / "ck", tmp_path / "ran"
    shutil.copytree(vstar_checkpoint, path)
    torch.save({"step": 1, "rng": RunsCode(mark)}, path / "trainer_state.pt")
    refused = r"trainer_state.pt holds more than tensors and plain data \((posix|nt).system\)"
    with pytest.raises(CheckpointError, match=refused):
        load_checkpoint(path).trainer_state()
    assert not mark.exists()
    assert load_checkpoint(vstar_checkpoint).trainer_state() == {"step": 1}


def test_a_malformed_manifest_is_named(vstar_checkpoint: Path, tmp_path: Path) -> None:
    path = damaged(vstar_checkpoint, tmp_path / "ck", "manifest.json", "overwritten")
    with pytest.raises(CheckpointError, match="manifest.json is not valid JSON"):
        load_checkpoint(path)


def test_a_catalog_the_tokenizer_cannot_write_is_named(vstar_checkpoint: Path, tmp_path: Path) -> None:
    """A catalog.json whose SIDs use a code the checkpoint's tokenizer lacks (edited, or copied from another
    run): a ``CheckpointError`` naming the folder and the token, as for any other damage, so the service's start
    and every command report it in one line."""
    path = tmp_path / "ck"
    shutil.copytree(vstar_checkpoint, path)
    catalog = json.loads((path / "catalog.json").read_text())
    item = next(iter(catalog["items"].values()))
    item["sid"] = item["sid"].rsplit("<", 1)[0] + "<c_999>"
    (path / "catalog.json").write_text(json.dumps(catalog))
    with pytest.raises(
        CheckpointError, match=rf"^checkpoint {path}: catalog.json does not fit the tokenizer: .*<c_999>"
    ):
        load_checkpoint(path)


def one_error_line(output: str, name: str) -> None:
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if name in line]
    assert len(lines) == 1 and " is corrupt: " in lines[0], output[-3000:]


COMMANDS = {
    "eval": ["eval", "--checkpoint", "{ck}", "--data", "{data}", "--limit", "2"],
    "eval ved": ["eval", "--checkpoint", "{ck}", "--data", "{data}", "--decoder", "ved", "--limit", "2"],
    "diagnose": ["diagnose", "--checkpoint", "{ck}", "--data", "{data}", "--limit", "2"],
    "fuse": ["fuse", "--checkpoint", "{ck}", "--data", "{data}"],
    "rl": ["rl", "--init", "{ck}", "--out", "{out}", "--data", "{data}", "--max-steps", "1"],
    "bench decode": ["bench", "decode", "--checkpoint", "{ck}", "--repeats", "1"],
    "bench ved": ["bench", "ved", "--checkpoint", "{ck}", "--repeats", "1"],
    "bench train": ["bench", "train", "--checkpoint", "{ck}", "--data", "{data}", "--steps", "1"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_reports_a_corrupt_checkpoint_in_one_line(
    command: str, vstar_checkpoint: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    ck = damaged(vstar_checkpoint, tmp_path / "ck", "model.safetensors", "cut")
    args = [a.format(ck=ck, data=tiny_data_dir, out=tmp_path / "out") for a in COMMANDS[command]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and not isinstance(result.exception, CheckpointError), result.output[-3000:]
    one_error_line(result.output, "model.safetensors")


def test_sft_resume_reports_a_corrupt_resume_state(tiny_data_dir: Path, tiny_policy: Policy, tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "sft.resume", tiny_policy, {"stage": "sft"}, trainer_state={"step": 1})
    damaged(tmp_path / "sft.resume", tmp_path / "bad.resume", "model.safetensors", "overwritten")
    args = ["sft", "--data", str(tiny_data_dir), "--out", str(tmp_path / "bad"), "--preset", "tiny", "--resume"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output[-3000:]
    one_error_line(result.output, "model.safetensors")


def test_serve_reports_a_corrupt_checkpoint_in_one_log_line(vstar_checkpoint: Path, tmp_path: Path) -> None:
    ck = damaged(vstar_checkpoint, tmp_path / "ck", "value_head.safetensors", "overwritten")
    run = subprocess.run(
        [sys.executable, "-m", "vstar", "serve", "--checkpoint", str(ck), "--port", str(free_port())],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "VSTAR_WARMUP": "false"},
    )  # fmt: skip
    assert run.returncode != 0
    one_error_line(run.stdout + run.stderr, "value_head.safetensors")
