"""``vstar bench ved`` on the tiny policy: the cells, the equal budget, and what the command refuses."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from typer.testing import CliRunner

from models.checkpoint import save_checkpoint
from models.policy import Policy
from models.value_head import value_head_for
from models.ved_config import VEDConfig
from tests.conftest import write_random_dataset
from training.bench.ved_bench import format_table, run_ved_bench
from training.rl.rollout import beam_tokens
from vstar import app


def test_each_cell_times_ved_against_the_beam_its_budget_pays_for(tiny_policy: Policy) -> None:
    head = value_head_for(tiny_policy)
    result = run_ved_bench(tiny_policy, head, VEDConfig(init_beams=4), gs=(3, 5), batches=(1, 2), repeats=1)
    rows = result["rows"]
    assert [(r["g"], r["batch"]) for r in rows] == [(3, 1), (3, 2), (5, 1), (5, 2)]
    for r in rows:
        assert r["budget"] == 2 * 2 * r["g"]  # twice what beam search of width G feeds over the 2 prefix levels
        # the same tokens, counted as beam search feeds them: the widest beam whose tokens fit the budget
        assert r["beam_tokens"] <= r["budget"] < beam_tokens(r["beam_width"] + 1, tiny_policy.trie)
        assert 0 < r["ved_tokens"] <= r["budget"] and r["ved_iterations"] >= 0
        assert r["ved_ms"] > 0 and r["beam_ms"] > 0 and r["ratio"] > 0
    table = format_table(result).splitlines()
    assert len(table) == 2 + len(rows) and table[2].startswith("| 3 | 1 | 12 | 6 |")
    given = run_ved_bench(tiny_policy, head, VEDConfig(init_beams=4, budget=20), gs=(3,), batches=(1,), repeats=1)
    # 6 first-level codes: 20 tokens pay for width 14 (6 + 14), not 20 // 2 = 10 (6 + 10, short of the budget)
    assert given["rows"][0]["budget"] == 20 and given["rows"][0]["beam_width"] == 14
    assert given["rows"][0]["beam_tokens"] == 20


def test_a_budget_for_more_beams_than_sids_reports_the_width_beam_search_runs(tiny_policy: Policy) -> None:
    """Beam search runs one beam per SID when asked for more (the rest is padding); the row reported the width
    the budget pays for, which did not run and fed tokens it did not feed."""
    sids = tiny_policy.trie.num_sids
    config = VEDConfig(init_beams=4, budget=4 * sids)  # pays for 2 x sids beams of 2 prefix tokens
    result = run_ved_bench(tiny_policy, value_head_for(tiny_policy), config, gs=(3,), batches=(1,), repeats=1)
    assert result["rows"][0]["beam_width"] == sids


def test_bench_ved_reads_the_checkpoints_head_and_ved_settings(tiny_policy: Policy, tmp_path: Path) -> None:
    head = value_head_for(tiny_policy)
    trained_with = asdict(VEDConfig(init_beams=8, budget=40, explore_slots=2))  # as vstar rl stores it
    manifest = {"stage": "rl", "value_head": asdict(head.config), "rl_config": {"ved_config": trained_with}}
    ckpt = save_checkpoint(tmp_path / "vstar", tiny_policy, manifest, {"value_head": head.state_dict()})
    out = tmp_path / "ved.json"
    args = ["bench", "ved", "--checkpoint", str(ckpt), "--num-candidates", "4", "--batches", "2", "--repeats", "1"]
    result = CliRunner().invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output[-3000:]
    assert "fresh value head" not in result.output
    rows = json.loads(out.read_text())["rows"]
    assert [(r["g"], r["batch"], r["budget"]) for r in rows] == [(4, 2, 40)]  # the budget it trained with
    result = CliRunner().invoke(app, [*args, "--budget", "24", "--json", str(out)])
    assert result.exit_code == 0, result.output[-3000:]
    assert json.loads(out.read_text())["rows"][0]["budget"] == 24  # --budget overrides it
    # a G whose initial tree the stored budget cannot pay for: named as the checkpoint's, not as a --budget not given
    result = CliRunner().invoke(app, [*args[:4], "--num-candidates", "24", "--batches", "1", "--repeats", "1"])
    line = result.output.strip().splitlines()[-1]
    assert (
        result.exit_code == 2
        and "the checkpoint's VED budget (--budget overrides it) 40 with G = 24: budget 40 " in line
    )
    data = tmp_path / "data"
    write_random_dataset(data, tiny_policy.catalog)
    eval_args = ["eval", "--data", str(data), "--checkpoint", str(ckpt), "--decoder", "ved", "--beams", "24"]
    result = CliRunner().invoke(app, [*eval_args, "--limit", "2", "--fusion-weight", "0"])
    assert (
        result.exit_code == 2 and "the checkpoint's VED budget (--budget overrides it) 40 with G = 24" in result.output
    )


def test_bench_ved_says_when_the_value_head_is_fresh(tiny_policy: Policy, tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "sft", tiny_policy, {"stage": "sft"})
    args = ["bench", "ved", "--checkpoint", str(ckpt), "--num-candidates", "4", "--batches", "1", "--repeats", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output[-3000:]
    assert "note: a fresh value head (the checkpoint has none)" in result.output


def test_bench_ved_refuses_a_budget_below_the_initial_tree_and_g_above_the_catalog(
    tiny_policy: Policy, tmp_path: Path
) -> None:
    ckpt = save_checkpoint(tmp_path / "sft", tiny_policy, {"stage": "sft"})
    base = ["bench", "ved", "--checkpoint", str(ckpt), "--repeats", "1"]
    result = CliRunner().invoke(app, [*base, "--num-candidates", "4", "--budget", "10"])
    assert result.exit_code == 2 and "--budget 10 with G = 4: budget 10 is below" in result.output, result.output
    sids = len(tiny_policy.catalog.sids)
    result = CliRunner().invoke(app, [*base, "--num-candidates", f"4,{sids + 1}"])
    assert result.exit_code == 2, result.output
    assert f"--num-candidates {sids + 1} is more than the {sids} SIDs of the catalog" in result.output
