"""``vstar diagnose``'s figures against their definitions, on hand-worked cases and the tiny catalog."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from models.checkpoint import save_checkpoint
from models.policy import Policy
from models.sid_catalog import SidCatalog
from models.sid_tokenizer import build_sid_tokenizer
from models.sid_trie import SidTrie
from models.transition import ShallowFusion, TransitionCounts
from models.value_head import value_head_for
from models.ved_config import VEDConfig, initial_beam_stats
from tests.test_cli import assert_one_line_error
from training.data.dataset import RecDataset
from training.rl.config import RLConfig
from training.rl.diagnose import DIAGNOSTIC_KEYS, diagnose
from training.rl.rollout import beam_source, beam_tokens, collect, equal_budget_beam_width
from training.rl.rows import rollout_fusion
from vstar import app


@pytest.mark.parametrize(("g", "budget", "width"), [(16, None, 16), (16, 64, 32), (4, None, 4)])
def test_beam_tokens_are_veds_accounting_of_the_same_search(
    tiny_policy: Policy, tiny_dataset: RecDataset, g: int, budget: int | None, width: int
) -> None:
    """Beam search's tokens per prompt are what VED reports for beam search of that width (its initial tree):
    a level's beams hold at most the catalog's prefixes of that level. The tiny catalog has 6 first-level
    codes, so width 16 feeds 6 + 16 tokens, not 2 x 16 (the empty slots were counted as fed)."""
    trie = tiny_policy.trie
    assert trie.level_sizes[:3] == [1, 6, 30]
    rows = tiny_dataset.splits["train"][:3]
    spent = collect(tiny_policy, rows, beam_source(g, budget)).tokens_spent
    expected = initial_beam_stats(VEDConfig(width, init_beams=width), trie).tokens_spent
    assert spent == [expected] * len(rows)
    assert expected == min(width, 6) + min(width, 30)


def test_a_budgeted_beam_is_the_widest_whose_tokens_fit_the_budget(
    tiny_policy: Policy, tiny_dataset: RecDataset
) -> None:
    """``--budget`` compares beam search with VED at equal cost, both counted with beam search's accounting.
    The width was budget // (depth - 1): on the tiny catalog's 6 first-level codes, 30 tokens ran width 15,
    which feeds 6 + 15 = 21; the widest width whose tokens fit is 24 (6 + 24 = 30)."""
    trie = tiny_policy.trie
    rows = tiny_dataset.splits["train"][:3]
    assert collect(tiny_policy, rows, beam_source(4, 30)).tokens_spent == [30] * len(rows)
    for budget in range(beam_tokens(4, trie), 2 * trie.num_sids):
        width = equal_budget_beam_width(budget, trie)
        assert beam_tokens(width, trie) <= budget
        assert width == trie.num_sids or beam_tokens(width + 1, trie) > budget  # the widest
    # every prefix of both levels (6 + 30) fits 64: beam search of every SID, which feeds no more
    assert equal_budget_beam_width(64, trie) == trie.num_sids and beam_tokens(trie.num_sids, trie) == 36


def test_the_readme_budgets_keep_their_beam_widths_on_amazon_industrial(shared_dataset: RecDataset) -> None:
    """Its 48 first-level codes are more than the README's widths: the budgets of its diagnose and bench ved
    figures (64 and 60 with G = 16 and 10, 40 for bench ved's G = 10) run the widths budget // 2 they ran."""
    catalog = shared_dataset.catalog
    trie = SidTrie(catalog, build_sid_tokenizer(catalog.vocabulary()).get_vocab().__getitem__)
    assert trie.level_sizes[1] == 48
    assert [equal_budget_beam_width(b, trie) for b in (64, 60, 40)] == [32, 30, 20]


def test_value_quality_reads_the_policy_without_dropout(tiny_catalog: SidCatalog, tiny_dataset: RecDataset) -> None:
    """``diagnose`` given a policy in training mode scores the value head on the states the rollout decoded
    with, dropout off (it was on: the small preset's attention dropout moved V and the log-probs), and hands the
    policy back in training mode."""
    rows, source = tiny_dataset.splits["valid"][:8], beam_source(16)
    out = {}
    for training in (False, True):
        policy = Policy.from_preset("small", tiny_catalog, seed=0)  # attention dropout 0.1
        policy.model.train(training)
        torch.manual_seed(0)
        head = value_head_for(policy)
        out[training] = diagnose(
            policy, rows, source, progress=False, value_head=head, item_emb=tiny_dataset.embeddings
        )
        assert policy.model.training == training
    assert out[True] == out[False]


def test_an_empty_split_is_named_before_the_checkpoint_loads(tiny_data_dir: Path, tmp_path: Path) -> None:
    """An empty split was refused only once the checkpoint had loaded, as "no rows to diagnose", naming no
    split; now as vstar eval refuses it."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    (data / "valid.csv").write_text((data / "valid.csv").read_text().splitlines()[0] + "\n")  # the header alone
    ckpt = tmp_path / "ckpt"  # a manifest alone: the refusal comes before the checkpoint loads
    ckpt.mkdir()
    (ckpt / "manifest.json").write_text("{}")
    result = CliRunner().invoke(app, ["diagnose", "--data", str(data), "--checkpoint", str(ckpt)])
    assert_one_line_error(result.exit_code, result.output, "the valid split of data has no rows to diagnose")


def fused_run_manifest(data: RecDataset, **config: Any) -> dict[str, Any]:
    """An RL checkpoint's manifest as a run with --fused-rollouts on ``data`` stores it."""
    rl = asdict(RLConfig(algo="grpo", fused_rollouts=True, **config))
    return {"stage": "rl", "rl_config": rl, "data": {"name": data.name, "fingerprint": data.fingerprint()}}


def diagnose_cli(data: Path, ckpt: Path, out: Path, *args: str) -> tuple[dict[str, Any], str]:
    result = CliRunner().invoke(app, ["diagnose", "--data", str(data), "--checkpoint", str(ckpt), "--json", str(out),
                                      *args])  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(out.read_text()), result.output


def test_a_fused_rollouts_run_is_diagnosed_fused_as_it_decoded(
    tiny_policy: Policy, tiny_dataset: RecDataset, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """A run with --fused-rollouts drew its groups fused with the transition counts; diagnose measured the
    policy's unfused candidate sets. It now decodes as the run did: at its weight, with counts of the rows it
    counted (train here: never the diagnosed valid rows), a diagnosed row the counts hold decoding without its
    own transition, as in training."""
    weight = 50.0
    ckpt = save_checkpoint(tmp_path / "fused", tiny_policy, fused_run_manifest(tiny_dataset, fusion_weight=weight))
    train = tiny_dataset.splits["train"]
    fusion = ShallowFusion(TransitionCounts.fit((s.history, s.target) for s in train), weight)
    for split, n in (("valid", 40), ("train", 24)):
        rows = tiny_dataset.splits[split][:n]
        diag, output = diagnose_cli(tiny_data_dir, ckpt, tmp_path / f"{split}.json", "--split", split, "--limit",
                                    str(n))  # fmt: skip
        assert f"weight 50, counts of the {len(train)} rows it counted" in output
        fused = diagnose(tiny_policy, rows, beam_source(16, None, fusion, frozenset(train)), progress=False)
        assert {k: diag[k] for k in DIAGNOSTIC_KEYS} == fused != diagnose(tiny_policy, rows, beam_source(16),
                                                                          progress=False)  # fmt: skip
        assert diag["rollout_fusion"] == {
            "weight": weight,
            "count_rows": len(train),
            "transition_pairs": fusion.counts.num_pairs,
            "own_transitions_left_out": 0 if split == "valid" else n,
        }
        assert diag["rollout_fusion_note"] is None
    # the train rows decode as RL's rollouts did (each row's own transition taken back), not with their answers
    assert fused == diagnose(tiny_policy, rows, beam_source(16, fusion=fusion), progress=False)
    leaked = diagnose(tiny_policy, rows, beam_source(16, None, fusion, frozenset()), progress=False)
    assert fused["reachability"] < leaked["reachability"]


def test_a_fused_run_whose_fusion_cannot_be_rebuilt_is_said_to_be_measured_unfused(
    tiny_policy: Policy, tiny_dataset: RecDataset, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """The weight of a run fused at its --init's weight is the one its manifest's fusion records (chosen by
    "init"); once ``vstar fuse`` chose another, or on other data than the run's, the run's fusion cannot be
    rebuilt, and the command says so (a note, ``rollout_fusion_note``) rather than measure something else."""
    manifest = fused_run_manifest(tiny_dataset)
    at_init = rollout_fusion(manifest | {"fusion": {"weight": 3.0, "chosen_by": "init"}}, tiny_dataset)
    assert at_init.fusion is not None and at_init.fusion.weight == 3.0 and at_init.note is None
    assert rollout_fusion({"rl_config": asdict(RLConfig())}, tiny_dataset) == rollout_fusion({}, tiny_dataset)
    assert rollout_fusion({}, tiny_dataset).fusion is None and rollout_fusion({}, tiny_dataset).note is None
    other = dict(manifest, data={"fingerprint": "another"}, rl_config=manifest["rl_config"] | {"fusion_weight": 2})
    assert "other data than" in str(rollout_fusion(other, tiny_dataset).note)
    refused = manifest | {"fusion": {"weight": 6.0, "chosen_by": "held-out"}}  # vstar fuse chose again
    recorded = rollout_fusion(refused | {"rollout_fusion_weight": 3.0}, tiny_dataset)  # a run that kept it apart
    assert recorded.fusion is not None and recorded.fusion.weight == 3.0 and recorded.note is None
    ckpt = save_checkpoint(tmp_path / "refused", tiny_policy, refused)
    diag, output = diagnose_cli(tiny_data_dir, ckpt, tmp_path / "d.json", "--limit", "8")
    note = "its RL run decoded its rollouts fused with transition counts (--fused-rollouts) at its --init's weight"
    assert f"note: {note}" in output and diag["rollout_fusion_note"].startswith(note)
    assert diag["rollout_fusion"] is None
    rows = tiny_dataset.splits["valid"][:8]
    assert {k: diag[k] for k in DIAGNOSTIC_KEYS} == diagnose(tiny_policy, rows, beam_source(16), progress=False)
