"""Checkpoints: the folder alone rebuilds the policy; writes are atomic; bad folders fail loudly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.beam_search import BeamSearchConfig, beam_search
from models.checkpoint import CheckpointError, content_digest, load_checkpoint, save_checkpoint
from models.policy import Policy

REPO = Path(__file__).resolve().parents[2]


def test_round_trip_rebuilds_same_decoder(tiny_policy: Policy, tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "ck", tiny_policy, {"stage": "test"}, extras={"head": {"w": torch.ones(3)}})
    loaded = load_checkpoint(path)
    assert loaded.manifest["stage"] == "test" and loaded.model_version
    assert torch.equal(loaded.extras["head"]["w"], torch.ones(3))
    assert loaded.policy.catalog.sids == tiny_policy.catalog.sids
    hist = [[tiny_policy.catalog.sids[3], tiny_policy.catalog.sids[7]]]
    a = beam_search(tiny_policy.model, tiny_policy.trie, *tiny_policy.encode_prompts(hist), BeamSearchConfig(5))
    b = beam_search(loaded.policy.model, loaded.policy.trie, *loaded.policy.encode_prompts(hist), BeamSearchConfig(5))
    assert torch.equal(a.sid_index, b.sid_index)
    torch.testing.assert_close(a.scores, b.scores)


@pytest.mark.parametrize("device", ["cpu:0", torch.device("cpu", 0)])
def test_a_device_torch_names_with_an_index_loads_the_extras_too(
    tiny_policy: Policy, tmp_path: Path, device: str | torch.device
) -> None:
    """safetensors refuses "cpu:0", which torch (and VSTAR_DEVICE) takes: the start blamed a sound file as corrupt."""
    path = save_checkpoint(tmp_path / "ck", tiny_policy, {"stage": "test"}, extras={"head": {"w": torch.ones(3)}})
    assert torch.equal(load_checkpoint(path, device).extras["head"]["w"], torch.ones(3))


def test_overwrite_is_atomic_and_leaves_no_temp(tiny_policy: Policy, tmp_path: Path) -> None:
    first = load_checkpoint(save_checkpoint(tmp_path / "ck", tiny_policy)).model_version
    second = load_checkpoint(save_checkpoint(tmp_path / "ck", tiny_policy)).model_version
    assert first != second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_failed_write_keeps_old_checkpoint(
    tiny_policy: Policy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path / "ck", tiny_policy, {"stage": "old"})

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny_policy.tokenizer, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path / "ck", tiny_policy, {"stage": "new"})
    assert load_checkpoint(tmp_path / "ck").manifest["stage"] == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_bad_folders_fail_with_named_problem(tiny_policy: Policy, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    path = save_checkpoint(tmp_path / "ck", tiny_policy, extras={"value_head": {"w": torch.zeros(1)}})
    (path / "value_head.safetensors").unlink()
    with pytest.raises(CheckpointError, match="value_head.safetensors is missing"):
        load_checkpoint(path)
    (path / "catalog.json").unlink()
    with pytest.raises(CheckpointError, match="catalog.json is missing"):
        load_checkpoint(path)
    path = save_checkpoint(tmp_path / "ck2", tiny_policy)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(manifest | {"format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(path)


def named_policy(policy: Policy) -> Policy:
    """``policy`` with a catalog that knows its items' external ids (the same model, not a copy)."""
    external = {i: f"SKU/{i:03d}" for i in policy.catalog.items}
    return Policy(policy.model, policy.tokenizer, policy.catalog.with_external_ids(external), policy.prompt)


def test_external_ids_round_trip_in_their_own_file(tiny_policy: Policy, tmp_path: Path) -> None:
    named = named_policy(tiny_policy)
    path = save_checkpoint(tmp_path / "named", named)
    assert json.loads((path / "item_map.json").read_text()) == {
        str(i): e for i, e in named.catalog.external_ids.items()
    }
    catalog = load_checkpoint(path).policy.catalog
    assert catalog.external_ids == named.catalog.external_ids and catalog.item_of_external_id["SKU/007"] == 7
    assert catalog.to_index() == tiny_policy.catalog.to_index()


def test_a_checkpoint_without_external_ids_is_written_and_loads_as_before(tiny_policy: Policy, tmp_path: Path) -> None:
    """No item_map.json, and catalog.json as it always was: older code reads it, and checkpoints written before
    external ids existed (this very shape) load with none."""
    path = save_checkpoint(tmp_path / "plain", tiny_policy)
    assert not (path / "item_map.json").exists()
    assert json.loads((path / "manifest.json").read_text())["format_version"] == 1
    assert json.loads((path / "catalog.json").read_text()) == {
        "depth": 3,
        "items": {str(i): {"sid": "".join(it.sid), "title": it.title} for i, it in tiny_policy.catalog.items.items()},
    }
    loaded = load_checkpoint(path).policy.catalog
    assert loaded.external_ids is None and loaded.item_of_external_id == {}
    named = save_checkpoint(tmp_path / "named", named_policy(tiny_policy))
    (named / "item_map.json").unlink()  # what a checkpoint written before this change holds
    assert load_checkpoint(named).policy.catalog.external_ids is None


def test_external_ids_are_not_part_of_the_content_digest(tiny_policy: Policy, tmp_path: Path) -> None:
    """They name items and change no score: a resumed RL run's --init that gained them is still its init."""
    plain = save_checkpoint(tmp_path / "plain", tiny_policy)
    named = save_checkpoint(tmp_path / "named", named_policy(tiny_policy))
    assert content_digest(plain) == content_digest(named)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1]", "item_map.json holds list, expected an object"),
        ("{", "item_map.json is not valid JSON"),
        ('{"x": "a"}', "item_map.json is malformed: key 'x' is not an item id"),
        (
            '{"0": "a"}',
            "item_map.json is malformed: external ids: no entry for items 1, 2, 3, 4, 5 and 114 more",
        ),
    ],
)
def test_a_malformed_item_map_is_named(tiny_policy: Policy, tmp_path: Path, text: str, message: str) -> None:
    path = save_checkpoint(tmp_path / "named", named_policy(tiny_policy))
    (path / "item_map.json").write_text(text)
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: {message}"):
        load_checkpoint(path)


# Runs ``save_checkpoint`` over an existing checkpoint and kills the process (``os._exit``: no cleanup
# runs, as with SIGKILL) just before the n-th file-system change made after the new folder is complete.
CRASHING_WRITER = """
import os, sys
from pathlib import Path
from models.checkpoint import load_checkpoint, save_checkpoint

target, crash_at = Path(sys.argv[1]), int(sys.argv[2])
policy = load_checkpoint(target).policy
CHANGES = {"os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "ctypes.call_function"}
state = {"armed": False, "seen": 0}

def hook(event, args):
    if event == "open" and str(args[0]).endswith("manifest.json") and "w" in str(args[1]):
        state["armed"] = True
    elif state["armed"] and event in CHANGES:
        state["seen"] += 1
        if state["seen"] == crash_at:
            os._exit(17)

sys.addaudithook(hook)
save_checkpoint(target, policy, {"stage": "new"})
"""


@pytest.mark.slow
def test_a_write_killed_at_any_point_leaves_old_or_new_and_no_leftovers(tiny_policy: Policy, tmp_path: Path) -> None:
    target = tmp_path / "ck"
    save_checkpoint(target, tiny_policy, {"stage": "old"})
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    kills = 0
    for crash_at in range(1, 10):
        run = subprocess.run(
            [sys.executable, "-c", CRASHING_WRITER, str(target), str(crash_at)],
            env=env,
            capture_output=True,
            timeout=300,
        )
        assert run.returncode in (0, 17), run.stderr.decode()[-2000:]
        stage = load_checkpoint(target).manifest["stage"]  # a CheckpointError here: nothing at the path
        assert stage in ("old", "new") and (run.returncode == 17 or stage == "new")
        save_checkpoint(target, tiny_policy, {"stage": "old"})  # the next write removes what the kill left
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
        if run.returncode == 0:
            break
        kills += 1
    assert kills >= 2, "the writer was killed at fewer than two points: the hook saw no renames"
