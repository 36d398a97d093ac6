"""Checkpoint I/O: one folder rebuilds the policy, its catalog and any extra heads.

Layout::

    CKPT/config.json, model.safetensors   save_pretrained (safetensors)
    CKPT/tokenizer*.json                  the tokenizer with its SID tokens
    CKPT/catalog.json                     item id -> SID and title (SID -> items is derived)
    CKPT/item_map.json                    item id -> external id, as the data's (only when it had one)
    CKPT/manifest.json                    prompt format, training config, data fingerprint,
                                          versions, model_version
    CKPT/<name>.safetensors               extra state dicts (the value head, ...)
    CKPT/trainer_state.pt                 optimizer/scheduler/RNG for --resume (optional)

Writes are atomic: everything goes to a sibling staging folder which then
replaces the target in one step (``models.atomic_folder``), so a process killed
at any point of a write leaves the old checkpoint or the new one at the path,
never a half-written folder nor none; what a killed write leaves beside the
target is removed by the next write.

The catalog's external ids (``models.sid_catalog``) are a file of their own,
written only for a catalog that has them, so a checkpoint without them is
byte for byte what it was before they existed, and ``FORMAT_VERSION`` stays:
older code reading a checkpoint that has the file ignores it (and answers with
item ids alone, as it always did). They are not part of ``content_digest``:
they name items and change no score.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import uuid
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from models.atomic_folder import leftovers, publish, staging_folder
from models.checkpoint_error import CheckpointError as CheckpointError  # part of this module's API
from models.policy import Policy
from models.sid_catalog import Item, SidCatalog, external_ids_from_json, parse_sid
from models.sid_tokenizer import PromptFormat
from models.weight_checks import first_non_finite, fit_problem

FORMAT_VERSION = 1
TRAINER_STATE = "trainer_state.pt"
ITEM_MAP = "item_map.json"


@dataclass
class LoadedCheckpoint:
    policy: Policy
    manifest: dict[str, Any]
    extras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    path: Path | None = None

    @property
    def model_version(self) -> str:
        return str(self.manifest["model_version"])

    def trainer_state(self) -> dict[str, Any] | None:
        assert self.path is not None
        f = self.path / TRAINER_STATE
        if not f.exists():
            return None
        damaged = _failed_crc(f)
        if damaged is not None:  # torch.load never checks the archive's CRCs: damage would load as other numbers
            raise CheckpointError(
                f"checkpoint {self.path}: {TRAINER_STATE} is corrupt: its entry {damaged} fails its CRC check"
            )
        try:  # tensors and plain data only: unpickling anything else could run code a checkpoint carries
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # torch.load raises whatever unpickling a damaged file raises
            unsafe = _unsafe_globals(f)
            if unsafe:
                raise CheckpointError(
                    f"checkpoint {self.path}: {TRAINER_STATE} holds more than tensors and plain data"
                    f" ({', '.join(unsafe)}), which vstar never writes; not loaded: unpickling it could run code"
                ) from None
            # the weights-only unpickler's own reason comes after its advice on weights_only=False
            detail = str(e).split("WeightsUnpickler error:")[-1]
            reason = next((line.strip() for line in detail.splitlines() if line.strip()), type(e).__name__)
            raise CheckpointError(f"checkpoint {self.path}: {TRAINER_STATE} is corrupt: {reason}") from None


def _failed_crc(path: Path) -> str | None:
    """The first entry of a ``torch.save`` archive whose bytes fail the CRC the archive stores for them; None
    when all pass, or when the file is no zip archive at all (``torch.load`` then names that damage)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        return None


def content_digest(path: str | Path) -> str:
    """A sha256 of what a checkpoint computes with, not of when or how it was written: its weights and extra
    state dicts (the value head, the transition counts: every ``.safetensors`` file), its catalog and its fusion
    weight. A checkpoint rewritten with the same (a finished run resumed stamps a new ``model_version``, and
    a tokenizer saved after a load writes its config with other keys) keeps it, as does one that gained or
    changed its external ids (``ITEM_MAP``), which name items in answers and change no score."""
    folder = Path(path)
    digest = hashlib.sha256()
    for f in [*sorted(folder.glob("*.safetensors")), folder / "catalog.json"]:
        digest.update(f.name.encode() + b"\0" + f.stat().st_size.to_bytes(8, "little"))
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    fusion = (_read_json(folder, "manifest.json").get("fusion") or {}).get("weight")
    digest.update(json.dumps({"fusion_weight": fusion}).encode())
    return digest.hexdigest()


def _unsafe_globals(path: Path) -> list[str]:
    """The classes and functions a ``torch.save`` file names that the weights-only unpickler refuses (read
    without unpickling); none for a file that is no such archive (damage)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # cut short, overwritten, not a torch.save archive: corrupt, which the caller says
        return []


def catalog_to_json(catalog: SidCatalog) -> dict[str, Any]:
    return {
        "depth": catalog.depth,
        "items": {str(i): {"sid": "".join(it.sid), "title": it.title} for i, it in sorted(catalog.items.items())},
    }


def catalog_from_json(data: dict[str, Any]) -> SidCatalog:
    items = {int(k): Item(int(k), v.get("title", ""), parse_sid(v["sid"])) for k, v in data["items"].items()}
    return SidCatalog(items, depth=int(data["depth"]))


def save_checkpoint(
    path: str | Path,
    policy: Policy,
    manifest: dict[str, Any] | None = None,
    extras: dict[str, dict[str, torch.Tensor]] | None = None,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Atomically write ``policy`` (plus extras) to ``path``; returns the path."""
    target = Path(path)
    tmp = staging_folder(target)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" at every validation would break the run's own bar
    try:
        policy.model.save_pretrained(tmp, safe_serialization=True)
        policy.tokenizer.save_pretrained(tmp)
        (tmp / "catalog.json").write_text(json.dumps(catalog_to_json(policy.catalog)))
        if policy.catalog.external_ids is not None:
            external = {str(i): e for i, e in sorted(policy.catalog.external_ids.items())}
            (tmp / ITEM_MAP).write_text(json.dumps(external, indent=0))
        for name, state in (extras or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / f"{name}.safetensors"))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        full = {
            "format_version": FORMAT_VERSION,
            "model_version": f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}",
            "prompt": policy.prompt.to_dict(),
            "tokenizer_class": type(policy.tokenizer).__name__,
            "extras": sorted(extras or {}),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
            **(manifest or {}),
        }
        (tmp / "manifest.json").write_text(json.dumps(full, indent=2, default=str))
        _fsync_dir(tmp)
        publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return target


def _fsync_dir(folder: Path) -> None:
    for f in folder.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())


def check_files(path: str | Path) -> dict[str, Any]:
    """The checks ``load_checkpoint`` makes before it builds the model (every file there, the manifest and
    catalog readable, each safetensors file whole); returns the manifest. ``CheckpointError`` naming the file."""
    return _checked(Path(path))[0]


def _checked(folder: Path) -> tuple[dict[str, Any], SidCatalog]:
    """``check_files``'s checks; the manifest and the catalog."""
    if not folder.is_dir():
        left = [p.name for p in leftovers(folder)]
        hint = f" (an interrupted write left {', '.join(left)} beside it)" if left else ""
        raise CheckpointError(f"checkpoint {folder} does not exist or is not a folder{hint}")
    for name in ("manifest.json", "catalog.json", "config.json", "tokenizer_config.json"):
        if not (folder / name).exists():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {name} is missing")
    manifest = _read_json(folder, "manifest.json")
    try:
        catalog = catalog_from_json(_read_json(folder, "catalog.json"))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {folder}: catalog.json is malformed: {e!r}") from None
    if (folder / ITEM_MAP).exists():  # a checkpoint of data without external ids has none
        try:
            catalog = catalog.with_external_ids(external_ids_from_json(_read_json(folder, ITEM_MAP)))
        except ValueError as e:
            raise CheckpointError(f"checkpoint {folder}: {ITEM_MAP} is malformed: {e}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {folder}: format_version {manifest.get('format_version')}, expected {FORMAT_VERSION}"
        )
    extras = [folder / f"{name}.safetensors" for name in manifest.get("extras", [])]
    for f in extras:
        if not f.exists():
            raise CheckpointError(f"checkpoint {folder}: manifest lists {f.stem} but {f.name} is missing")
    for f in sorted(folder.glob("*.safetensors")):  # model weights (one file or shards) and the extras
        _check_safetensors(f)
    return manifest, catalog


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild what ``save_checkpoint`` wrote; ``CheckpointError`` naming the file for anything wrong."""
    folder = Path(path)
    manifest, catalog = _checked(folder)
    extras = [folder / f"{name}.safetensors" for name in manifest.get("extras", [])]
    try:
        # loaded whatever the shapes, to name what does not fit (transformers raises a RuntimeError that only
        # points at its log); a tensor missing from the file it only logs, and fills with fresh random weights
        model, fit = cast(  # a (model, loading info) pair with output_loading_info, which its typing omits
            tuple[PreTrainedModel, dict[str, Any]],
            AutoModelForCausalLM.from_pretrained(
                folder, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True
            ),
        )
        prompt = PromptFormat(**manifest["prompt"])
        # Load with the class that saved it: AutoTokenizer would pick the architecture's
        # class (Qwen2's) and drop the word-level model of the SID-only tokenizer.
        tokenizer_cls = getattr(transformers, str(manifest.get("tokenizer_class")), None)
        if tokenizer_cls is None:
            tokenizer_cls = AutoTokenizer if prompt.text_template else PreTrainedTokenizerFast
        tokenizer = tokenizer_cls.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise CheckpointError(f"checkpoint {folder}: cannot load model or tokenizer: {e}") from None
    if tokenizer.pad_token_id is None:  # every saved tokenizer has one: its config did not load
        raise CheckpointError(f"checkpoint {folder}: the tokenizer has no pad token (tokenizer_config.json missing?)")
    tokenizer.padding_side = "left"
    _check_fit(folder, fit)
    _check_finite(folder, model.named_parameters())
    model.eval()
    try:  # the trie maps each SID token to the vocabulary: one the tokenizer lacks is refused there
        policy = Policy(model, tokenizer, catalog, prompt)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {folder}: catalog.json does not fit the tokenizer: {e}") from None
    policy = policy.to(device)
    to = torch.device(device)  # safetensors names the CPU "cpu" alone: "cpu:0", which torch takes, it refuses
    loaded = {}
    for f in extras:
        try:
            loaded[f.stem] = load_file(str(f), device="cpu" if to.type == "cpu" else str(to))
        except SafetensorError as e:
            raise CheckpointError(f"checkpoint {folder}: {f.name} is corrupt: {e}") from None
        _check_finite(folder, ((f"{f.stem}.{k}", t) for k, t in loaded[f.stem].items()))
    return LoadedCheckpoint(policy, manifest, loaded, folder)


def _check_fit(folder: Path, fit: dict[str, Any]) -> None:
    """A ``CheckpointError`` when the weights are not those of the model ``config.json`` describes: a tensor
    missing (it would be random), one the model has no place for (dropped), or one of another shape."""
    problem = fit_problem(fit)
    if problem is not None:
        raise CheckpointError(f"checkpoint {folder}: its weights do not fit config.json: {problem}")


def _check_finite(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """A ``CheckpointError`` naming the first floating-point tensor that holds nan or inf: such a model scores
    nothing (a run that diverged, or a file damaged in a way its format cannot tell)."""
    name = first_non_finite(tensors)
    if name is not None:
        raise CheckpointError(f"checkpoint {folder}: {name} holds nan or inf (did the run that wrote it diverge?)")


def _read_json(folder: Path, name: str) -> dict[str, Any]:
    try:
        data = json.loads((folder / name).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {folder}: {name} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {folder}: {name} holds {type(data).__name__}, expected an object")
    return data


def _check_safetensors(f: Path) -> None:
    """Parse the header and check that it covers the file exactly: what a truncated or overwritten file
    fails (a flipped bit inside the tensor data is not detectable without a checksum)."""
    try:
        with safe_open(str(f), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {f.parent}: {f.name} is corrupt: {e}") from None
