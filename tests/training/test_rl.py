"""RL trainer: loss formulas, one-step smoke tests (TRL style), run/resume, and the CLI contracts."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import training.rl.run as rl_run
from models.checkpoint import load_checkpoint, save_checkpoint
from models.node_bonus import NodeBonus
from models.policy import Policy
from models.transition import ShallowFusion, TransitionCounts
from models.value_head import value_head_for as new_value_head
from models.value_head import value_head_manifest
from models.ved import ved_search
from models.ved_config import VEDConfig, checkpoint_ved_config
from training.bench.rl_bench import clone
from training.cli.options import select_rows
from training.data.dataset import RecDataset, Sample, popular_sids
from training.loop import carry_external_ids
from training.rl.config import EXPLORE_SLOTS, VALUE_WARMUP, RLConfig
from training.rl.diagnose import DIAGNOSTIC_KEYS, VALUE_KEYS, spearman
from training.rl.loss import clipped_pg, k3_kl, policy_loss
from training.rl.rollout import beam_source, collect
from training.rl.rows import fuse_rl_checkpoint
from training.rl.run import train_rl
from training.rl.trainer import RLTrainer
from training.run_files import resume_folder
from training.sft.config import SFTConfig
from training.sft.trainer import train_sft


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory: pytest.TempPathFactory, tiny_policy: Policy) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("rl") / "init", tiny_policy, {"stage": "sft"})


def params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def changed(before: list[torch.Tensor], model: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# ---- formulas


def test_config_rejects_switches_without_vstar_and_test_split() -> None:
    with pytest.raises(ValueError, match="--algo vstar"):
        RLConfig(algo="grpo", sibling=False)
    with pytest.raises(ValueError, match="test split"):
        RLConfig(train_splits=("train", "test"))
    with pytest.raises(ValueError, match="algo"):
        RLConfig(algo="ppo")
    with pytest.raises(ValueError, match="sibling_norm"):
        RLConfig(algo="vstar", sibling_norm="batch")
    assert RLConfig(algo="vstar").sibling_norm == "group"  # the paper's own-std scale is the ablation
    for weights in ((), (0.3, -0.5, 1.0), (0.0, 0.0, 0.0), (0.3, math.nan, 1.0)):
        with pytest.raises(ValueError, match="level weights must be"):
            RLConfig(algo="vstar", level_weights=weights)
    with pytest.raises(ValueError, match="dense reward"):
        RLConfig(algo="grpo", level_weights=(0.3, 0.5, 1.0))
    with pytest.raises(ValueError, match="dense reward"):
        RLConfig(algo="vstar", dense=False, level_weights=(0.3, 0.5, 1.0))


def test_clipped_pg_and_k3_hand_cases() -> None:
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    # A > 0: gains above 1 + eps are clipped; A < 0: losses below 1 - eps are clipped
    torch.testing.assert_close(clipped_pg(ratio, adv, 0.2), torch.tensor([-1.2, -0.5, 1.5, 0.8]))
    logp = torch.log(torch.tensor([0.25, 0.5]))
    ref = torch.log(torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor([2 - math.log(2) - 1, 0.0]))


def test_policy_loss_combines_terms() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.5]]))
    ref = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    adv = torch.tensor([1.0, -1.0])
    sib_adv = torch.tensor([[0.7, 0.0], [-0.7, 0.0]])
    sib_w = torch.tensor([[0.5, 0.0], [1.0, 0.0]])
    loss, stats = policy_loss(logp, logp.detach(), ref, adv, sib_adv, sib_w, 0.2, 0.1, 2.0)
    grpo = (-1 - 1 + 1 + 1) / 4  # ratio 1: -A per token
    sib = (-0.7 * 0.5 + 0.7 * 1.0) / 1.5
    kl = (2 - math.log(2) - 1) / 4
    assert stats["grpo_loss"] == pytest.approx(grpo) and stats["sibling_loss"] == pytest.approx(sib)
    assert loss.item() == pytest.approx(grpo + 2.0 * sib + 0.1 * kl, rel=1e-5)


# ---- one-step smoke tests


def test_fused_rollouts_decode_as_served_without_the_rows_own_transition(tiny_policy: Policy) -> None:
    samples = [Sample("u0", (1, 2), 7), Sample("u1", (3,), 9)]
    own = TransitionCounts.fit((s.history, s.target) for s in samples)  # each row's own transition only
    plain = collect(tiny_policy, samples, beam_source(16)).sid_index
    assert torch.equal(collect(tiny_policy, samples, beam_source(16, fusion=ShallowFusion(own, 50.0))).sid_index, plain)
    # another row also saw 2 -> 7: that count is the counts' own knowledge, and it reaches row u0
    other = TransitionCounts.fit([*((s.history, s.target) for s in samples), ((8, 2), 7)])
    fused = collect(tiny_policy, samples, beam_source(16, fusion=ShallowFusion(other, 50.0))).sid_index
    sid7 = tiny_policy.catalog.sid_index[tiny_policy.catalog.sid_of(7)]
    assert fused[0, 0] == sid7 != plain[0, 0]  # counted as the row's own transition too, it would lead there as well
    assert torch.equal(fused[1], plain[1])


def test_fused_rollouts_need_a_weight(tiny_policy: Policy, tiny_dataset: RecDataset, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="transition counts"):
        RLTrainer(tiny_policy, tiny_policy, RLConfig(fused_rollouts=True), total_steps=1)
    init = save_checkpoint(tmp_path / "init", tiny_policy, {"stage": "sft"})  # no fusion chosen
    config = RLConfig(algo="grpo", max_steps=1, batch_size=4, eval_limit=8, fused_rollouts=True)
    with pytest.raises(ValueError, match="needs a fusion weight above 0"):
        train_rl(tiny_dataset, init, tmp_path / "rl", config, progress=False)
    for algo in ("grpo", "vstar"):  # beam search's rollouts and VED's
        fused = replace(config, algo=algo, fusion_weight=2.0, value_warmup=1)
        summary = train_rl(tiny_dataset, init, tmp_path / algo, fused, progress=False)
        manifest = load_checkpoint(tmp_path / algo).manifest
        assert summary["steps"] == 1 and manifest["rl_config"]["fused_rollouts"]
        assert manifest["rollout_fusion_weight"] == 2.0  # kept apart from ``fusion``, which vstar fuse changes


def test_fused_rollouts_without_a_weight_say_where_the_zero_came_from(
    tiny_policy: Policy, tiny_dataset: RecDataset, tmp_path: Path
) -> None:
    config = RLConfig(algo="grpo", max_steps=1, batch_size=4, eval_limit=8, fused_rollouts=True)
    cases = [
        ({"weight": 6.0}, 0.0, "--fusion-weight is 0;"),  # the init has a weight: the 0 is the option's
        ({}, None, "the --init checkpoint .* has no chosen fusion weight;"),
        ({"weight": 0.0, "chosen_by": "held-out"}, None, "the --init checkpoint .* has fusion weight 0;"),
    ]
    for i, (fusion, given, message) in enumerate(cases):
        init = save_checkpoint(tmp_path / f"init{i}", tiny_policy, {"stage": "sft", "fusion": fusion})
        with pytest.raises(ValueError, match=f"--fused-rollouts needs a fusion weight above 0: {message}"):
            train_rl(tiny_dataset, init, tmp_path / f"rl{i}", replace(config, fusion_weight=given), progress=False)


def test_fused_ved_ranks_as_fused_beam_search_does(tiny_policy: Policy) -> None:
    catalog, trie = tiny_policy.catalog, tiny_policy.trie
    head = new_value_head(tiny_policy)
    ids, mask = tiny_policy.encode_prompts([[catalog.sid_of(1)], [catalog.sid_of(3), catalog.sid_of(2)]])
    config = VEDConfig(num_candidates=8, budget=64)
    plain = ved_search(tiny_policy.model, head, trie, ids, mask, config)
    nothing = NodeBonus.from_dense(torch.zeros(2, trie.num_nodes))
    zero = ved_search(tiny_policy.model, head, trie, ids, mask, config, nothing)
    assert torch.equal(plain.decode.sid_index, zero.decode.sid_index)
    # strong transitions lead the set, there even when the unfused search did not return them
    counts = TransitionCounts.fit([((1,), 30), ((2,), 31)])
    bonus = ShallowFusion(counts, 50.0).node_bonus([(1,), (3, 2)], catalog, trie)
    fused = ved_search(tiny_policy.model, head, trie, ids, mask, config, bonus)
    want = [catalog.sid_index[catalog.sid_of(i)] for i in (30, 31)]
    assert fused.decode.sid_index[:, 0].tolist() == want
    assert want[0] not in plain.decode.sid_index[0].tolist() or want[1] not in plain.decode.sid_index[1].tolist()
    score = fused.log_probs[:, 0] + bonus.dense()[[0, 1], trie.sid_node[torch.tensor(want)]]
    assert torch.allclose(fused.decode.scores[:, 0], score)  # the returned score includes the leaf's bonus


def test_grpo_step_updates_policy_not_reference(tiny_policy: Policy, tiny_dataset: RecDataset) -> None:
    policy, reference = clone(tiny_policy), clone(tiny_policy)
    ref_before, before = params(reference.model), params(policy.model)
    trainer = RLTrainer(policy, reference, RLConfig(algo="grpo", batch_size=8, lr=1e-3), total_steps=4)
    stats = trainer.step(tiny_dataset.splits["train"][:8])
    assert math.isfinite(stats["loss"]) and math.isnan(stats["value_loss"])
    assert changed(before, policy.model) and not changed(ref_before, reference.model)
    assert stats["sibling_tokens"] == 0 and stats["tokens_per_prompt"] == 6 + 16  # the 6 first-level codes, 16 beams
    assert stats["distinct"] == 16 and 0 <= stats["reachability"] <= 1


def test_a_steps_logged_lr_is_the_one_it_stepped_with(tiny_policy: Policy, tiny_dataset: RecDataset) -> None:
    """The step figure ``lr`` is the learning rate the step's update used (as SFT logs it), not the next step's:
    100 steps warm up over 3, so the first three steps run at 1/3, 2/3 and 3/3 of the lr."""
    policy, reference = clone(tiny_policy), clone(tiny_policy)
    trainer = RLTrainer(policy, reference, RLConfig(algo="grpo", batch_size=4, lr=3e-4), total_steps=100)
    used = []
    for i in range(3):
        used.append(trainer.optimizer.param_groups[0]["lr"])
        stats = trainer.step(tiny_dataset.splits["train"][4 * i : 4 * i + 4])
        assert stats["lr"] == pytest.approx(used[-1])
    assert used == pytest.approx([1e-4, 2e-4, 3e-4])


@pytest.mark.parametrize("dense", [True, False])
def test_vstar_step_without_ved_trains_value_head(
    tiny_policy: Policy, tiny_dataset: RecDataset, dense: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.rl.trainer as trainer_module
    from training.rl.rewards import batch_value_rewards

    policy, reference = clone(tiny_policy), clone(tiny_policy)
    head = new_value_head(policy)
    ref_before, before, head_before = params(reference.model), params(policy.model), params(head)
    config = RLConfig(algo="vstar", ved=False, dense=dense, batch_size=8, lr=1e-3)
    trainer = RLTrainer(policy, reference, config, 4, head, tiny_dataset.embeddings)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rule, value rewards) of the step

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = batch_value_rewards(*args, **kwargs)
        seen.append((args[4], out))
        return out

    monkeypatch.setattr(trainer_module, "batch_value_rewards", spy)
    stats = trainer.step(tiny_dataset.splits["train"][:8])
    [(rule, v_rewards)] = seen  # (B, G), (B, G, D+1): r_0 = 0, then the prefixes' rewards
    if dense:  # the dense reward scores every level (a wrong prefix costs, the target's earns)
        assert bool((v_rewards[..., 1:-1] != 0).any())
    else:  # --no-dense: the exact match at the complete SID, nothing before it
        assert not bool(v_rewards[..., :-1].any()) and torch.equal(v_rewards[..., -1], rule.float())
    assert math.isfinite(stats["loss"]) and math.isfinite(stats["value_loss"])
    assert changed(before, policy.model) and not changed(ref_before, reference.model)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert changed(head_before, head)
    assert stats["sibling_tokens"] > 0  # 16 candidates over a 6x5x5 trie always share parents


def test_vstar_step_with_ved(tiny_policy: Policy, tiny_dataset: RecDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    """V-STAR's rollouts come from VED (with its value head), GRPO's from beam search."""
    import training.rl.trainer as trainer_module

    built: list[str] = []
    for name in ("ved_source", "beam_source"):
        real = getattr(trainer_module, name)
        monkeypatch.setattr(
            trainer_module, name, lambda *a, _real=real, _name=name, **k: built.append(_name) or _real(*a, **k)
        )
    policy, reference = clone(tiny_policy), clone(tiny_policy)
    head = new_value_head(policy)
    trainer = RLTrainer(policy, reference, RLConfig(algo="vstar", batch_size=4), 4, head, tiny_dataset.embeddings)
    stats = trainer.step(tiny_dataset.splits["train"][:4])
    assert math.isfinite(stats["loss"]) and math.isfinite(stats["value_loss"]) and stats["tokens_per_prompt"] > 0
    assert built == ["ved_source"]
    RLTrainer(clone(tiny_policy), reference, RLConfig(algo="grpo", batch_size=4), 4).step(
        tiny_dataset.splits["train"][:4]
    )
    assert built == ["ved_source", "beam_source"]


def test_dense_rewards_need_embeddings(tiny_policy: Policy) -> None:
    with pytest.raises(ValueError, match=r"item embeddings \(item_emb.npy in --data; vstar embed .*--no-dense"):
        RLTrainer(tiny_policy, tiny_policy, RLConfig(algo="vstar", ved=False), 1, new_value_head(tiny_policy), None)


def test_value_warmup_step_trains_only_the_value_head(tiny_policy: Policy, tiny_dataset: RecDataset) -> None:
    """The warm-up schedule: TD steps of V_phi only; the policy, its optimizer, its cosine schedule and the
    RL step counter stay where they were, so RL then starts exactly as it would have without it."""
    policy, reference = clone(tiny_policy), clone(tiny_policy)
    head = new_value_head(policy)
    before, head_before = params(policy.model), params(head)
    trainer = RLTrainer(policy, reference, RLConfig(algo="vstar", batch_size=4), 10, head, tiny_dataset.embeddings)
    lr = trainer.scheduler.get_last_lr()
    losses = [trainer.value_warmup_step(tiny_dataset.splits["train"][i : i + 4])["value_loss"] for i in (0, 4)]
    assert all(math.isfinite(x) for x in losses)
    assert not changed(before, policy.model) and changed(head_before, head)
    assert trainer.step_count == 0 and trainer.scheduler.last_epoch == 0 and trainer.scheduler.get_last_lr() == lr
    assert not any(trainer.optimizer.state.values())  # the policy's AdamW never stepped


def test_value_coef_trains_the_backbone_and_leaves_the_head_to_its_own_update(
    tiny_policy: Policy, tiny_dataset: RecDataset
) -> None:
    """value_coef > 0 adds V_phi's TD loss, not detached, to the policy's loss: the same rollout (beam
    candidates, sibling term off) moves the policy differently, while V_phi's own step, which reads the
    states before the policy step, is the same as without it."""
    rows = tiny_dataset.splits["train"][:4]
    config = RLConfig(algo="vstar", ved=False, sibling=False, batch_size=4)
    out = []
    for coef in (0.0, 5.0):
        policy, reference = clone(tiny_policy), clone(tiny_policy)
        torch.manual_seed(0)
        head = new_value_head(policy)
        trainer = RLTrainer(policy, reference, replace(config, value_coef=coef), 10, head, tiny_dataset.embeddings)
        stats = trainer.step(rows)
        out.append((params(policy.model), params(head), stats))
    (policy_0, head_0, stats_0), (policy_5, head_5, stats_5) = out
    assert "value_aux_loss" not in stats_0 and math.isfinite(stats_5["value_aux_loss"])
    assert stats_5["value_aux_loss"] == pytest.approx(stats_0["value_loss"])  # the same TD loss, before either step
    assert any(not torch.equal(a, b) for a, b in zip(policy_0, policy_5, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(head_0, head_5, strict=True))
    with pytest.raises(ValueError, match="value_coef"):
        RLConfig(value_coef=0.5)  # grpo has no value head
    with pytest.raises(ValueError, match="value_coef"):
        RLConfig(algo="vstar", value_coef=-1.0)


def test_rl_config_nests_the_ved_config() -> None:
    assert RLConfig().value_warmup == VALUE_WARMUP > 0
    assert RLConfig().ved_config == VEDConfig(explore_slots=EXPLORE_SLOTS) and EXPLORE_SLOTS > 0
    config = RLConfig(algo="vstar", num_candidates=8, ved_config=VEDConfig(budget=40, explore_slots=2))
    assert config.ved_config == VEDConfig(num_candidates=8, budget=40, explore_slots=2)  # G comes from the RL config
    assert asdict(config)["ved_config"]["budget"] == 40
    with pytest.raises(ValueError, match="value_warmup"):
        RLConfig(value_warmup=-1)
    with pytest.raises(ValueError, match="VED's token budget"):
        RLConfig(algo="grpo", ved_config=VEDConfig(budget=64))


# ---- runs


def interrupt_at_step(n: int, monkeypatch: pytest.MonkeyPatch, run: Callable[[], object]) -> None:
    """``run`` an RL run killed (KeyboardInterrupt) as its ``n``-th RL step starts; steps work again after."""
    original = RLTrainer.step
    calls = {"n": 0}

    def interrupted(self: RLTrainer, samples: list) -> dict[str, float]:
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return original(self, samples)

    monkeypatch.setattr(RLTrainer, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(RLTrainer, "step", original)


def test_train_rl_writes_checkpoint_and_resumes(
    tiny_dataset: RecDataset, init_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "rl"
    config = RLConfig(algo="vstar", ved=False, max_steps=3, batch_size=4, eval_every=1, eval_limit=8, value_warmup=2)
    interrupt_at_step(3, monkeypatch, lambda: train_rl(tiny_dataset, init_ckpt, out, config, progress=False))
    # a budget the initial tree cannot fit stops a new run before it writes: the interrupted one stays resumable
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="budget 2 is below"):
        train_rl(tiny_dataset, init_ckpt, out, replace(config, ved=True, ved_config=VEDConfig(budget=2)))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files
    summary = train_rl(tiny_dataset, init_ckpt, out, config, resume=True, progress=False)
    assert summary["steps"] == 3 and [h["step"] for h in summary["history"]] == [0, 1, 2, 3]
    assert summary["value_warmup"]["steps"] == 2  # it ran before the interruption: reported, not run again
    steps = [json.loads(line)["step"] for line in Path(summary["steps_log"]).read_text().splitlines()]
    assert steps == [1, 2, 3]
    ckpt = load_checkpoint(out)
    assert ckpt.manifest["stage"] == "rl" and ckpt.manifest["selection"]["step"] >= 1
    assert "value_head" in ckpt.extras and ckpt.manifest["value_head"]["hidden_size"] == 32
    # an init without a fusion choice: the kept model's weight is chosen on the held-out rows
    assert ckpt.manifest["fusion"]["chosen_by"] == "held-out" and "transitions" in ckpt.extras
    assert summary["fusion"]["weight"] == ckpt.manifest["fusion"]["weight"]
    with pytest.raises(ValueError, match="different configuration"):
        train_rl(tiny_dataset, init_ckpt, out, RLConfig(algo="grpo", max_steps=3), resume=True, progress=False)
    # the other command's run: named as such, not as a list of every setting that differs
    with pytest.raises(ValueError, match=r"rl.resume holds the state of a vstar rl run, not of a vstar sft run: "
                       "resume it with vstar rl --resume"):  # fmt: skip
        train_sft(tiny_dataset, out, SFTConfig(preset="tiny", max_steps=1), resume=True, progress=False)
    sft_out = tmp_path / "sft"
    save_checkpoint(resume_folder(sft_out), load_checkpoint(init_ckpt).policy, {"stage": "sft"}, trainer_state={})
    with pytest.raises(ValueError, match="holds the state of a vstar sft run, not of a vstar rl run"):
        train_rl(tiny_dataset, init_ckpt, sft_out, config, resume=True, progress=False)


@pytest.mark.parametrize(("algo", "eval_every"), [("grpo", 10), ("vstar", 10), ("grpo", 1)])
def test_a_diverged_rl_run_stops_with_its_step_and_what_to_do(
    tiny_dataset: RecDataset, init_ckpt: Path, tmp_path: Path, algo: str, eval_every: int
) -> None:
    # lr 1e30 overflows the weights within a few updates: the next rollout (beam search, or VED's initial tree)
    # finds no finite score, or a validation right after the update ranks no full list, and the run says so
    # instead of failing inside the backbone on an empty batch or comparing a score of None
    config = RLConfig(algo=algo, max_steps=8, batch_size=4, eval_every=eval_every, eval_limit=8, value_warmup=1,
                      lr=1e30)  # fmt: skip
    before = {p: p.read_bytes() for p in init_ckpt.rglob("*") if p.is_file()}
    what = "the policy scored no SID as finite for any of 4 prompts" if eval_every > 1 else (
        "the model scored fewer than 10 SIDs as finite for each of 8 selection rows")  # fmt: skip
    # validated every step, the steps before the overflow kept a model at --out, and the error says so
    kept = f"; {tmp_path / 'rl'} holds the model an earlier validation kept" if eval_every == 1 else ""
    again = r"start again with a lower --lr than 1e\+30.* and --force \(--resume would go on at the lr that diverged\)"
    with pytest.raises(ValueError, match=rf"^training diverged at step \d+ \({what}\): {again}{kept}$"):
        train_rl(tiny_dataset, init_ckpt, tmp_path / "rl", config, progress=False)
    assert (tmp_path / "rl").exists() == bool(kept)
    if kept:
        assert load_checkpoint(tmp_path / "rl").manifest["selection"]["step"] >= 1
    assert {p: p.read_bytes() for p in init_ckpt.rglob("*") if p.is_file()} == before


def test_a_diverged_run_over_an_earlier_runs_model_does_not_claim_it(
    tiny_dataset: RecDataset, init_ckpt: Path, tmp_path: Path
) -> None:
    """A run (--force) onto an earlier run's checkpoint that diverges before its first validation kept nothing:
    the model at --out is the earlier run's, and the error must not call it this run's."""
    out = tmp_path / "rl"
    shutil.copytree(init_ckpt, out)
    config = RLConfig(algo="grpo", max_steps=8, batch_size=4, eval_every=10, eval_limit=8, lr=1e30)
    with pytest.raises(ValueError, match=r"^training diverged at step \d+ .*diverged\)$"):
        train_rl(tiny_dataset, init_ckpt, out, config, progress=False)


def test_a_resume_whose_kept_model_is_gone_stops_before_it_trains(
    tiny_dataset: RecDataset, init_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kept model at --out is read back at the run's end, and a later validation that does not beat it never
    writes it again: without it a resumed run would train to its end and then fail, every resume after alike."""
    out = tmp_path / "rl"
    config = RLConfig(algo="grpo", max_steps=4, batch_size=4, eval_every=1, eval_limit=8, fusion_weight=0)
    interrupt_at_step(3, monkeypatch, lambda: train_rl(tiny_dataset, init_ckpt, out, config, progress=False))
    kept = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (out / "model.safetensors").write_bytes(b"cut")
    monkeypatch.setattr(RLTrainer, "step", lambda *a, **k: pytest.fail("a step trained"))
    with pytest.raises(ValueError, match=r"^--resume: the model this run kept is not whole \(checkpoint .*rl: "
                       r"model.safetensors is corrupt.*\); the run would train on"):  # fmt: skip
        train_rl(tiny_dataset, init_ckpt, out, config, resume=True, progress=False)
    shutil.rmtree(out)
    with pytest.raises(ValueError, match=r"^--resume: the model this run kept is not whole \(checkpoint .*rl does "):
        train_rl(tiny_dataset, init_ckpt, out, config, resume=True, progress=False)
    out.mkdir()
    for path, data in kept.items():
        path.write_bytes(data)
    monkeypatch.undo()
    assert train_rl(tiny_dataset, init_ckpt, out, config, resume=True, progress=False)["steps"] == 4


def test_a_run_that_keeps_its_last_model_resumes_or_diverges_before_it_kept_one(
    tiny_dataset: RecDataset, init_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing held out, RL validates its init at step 0 and keeps no model until its first validation
    after a step: a stop before that one was refused at --resume ("the model this run kept is not whole"), and a
    divergence there named a kept model at --out that did not exist."""
    out = tmp_path / "rl"
    config = RLConfig(algo="grpo", max_steps=4, batch_size=4, eval_every=3, eval_limit=8, train_splits=("valid",),
                      holdout=0, fusion_weight=0)  # fmt: skip
    interrupt_at_step(2, monkeypatch, lambda: train_rl(tiny_dataset, init_ckpt, out, config, progress=False))
    assert not out.exists()
    assert train_rl(tiny_dataset, init_ckpt, out, config, resume=True, progress=False)["steps"] == 4
    assert load_checkpoint(out).manifest["selection"]["step"] == 4
    diverging = replace(config, lr=1e30, max_steps=8, eval_every=10)
    with pytest.raises(ValueError, match=r"^training diverged at step \d+ .*diverged\)$"):
        train_rl(tiny_dataset, init_ckpt, tmp_path / "dv", diverging, progress=False)
    assert not (tmp_path / "dv").exists()


def test_a_resume_whose_init_was_replaced_is_refused(
    tiny_dataset: RecDataset, init_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The --init path holding other weights would change the reference model mid-run: refused. The same
    weights, counts and fusion weight written again (a finished SFT run resumed stamps a new model version), or
    named by another path, are the same init. A state written before the version was kept compares the path."""
    init, out = tmp_path / "init", tmp_path / "rl"
    shutil.copytree(init_ckpt, init)
    config = RLConfig(algo="grpo", max_steps=3, batch_size=4, eval_every=1, eval_limit=8, fusion_weight=0)
    interrupt_at_step(3, monkeypatch, lambda: train_rl(tiny_dataset, init, out, config, progress=False))
    was = load_checkpoint(init)
    manifest = {k: v for k, v in was.manifest.items() if k != "model_version"}
    other = load_checkpoint(init)
    with torch.no_grad():
        next(other.policy.model.parameters()).add_(0.01)
    save_checkpoint(init, other.policy, manifest, other.extras)  # another model at the same path
    with pytest.raises(ValueError, match=r"--init checkpoint .*init is not the one the run began from .*other weights"):
        train_rl(tiny_dataset, init, out, config, resume=True, progress=False)
    save_checkpoint(init, was.policy, manifest, was.extras)  # the same weights saved again: a new model version
    assert load_checkpoint(init).model_version != was.model_version
    elsewhere = tmp_path / "moved" / "init"
    shutil.copytree(init, elsewhere)  # and named by another path
    assert train_rl(tiny_dataset, elsewhere, out, config, resume=True, progress=False)["steps"] == 3
    state_file = tmp_path / "rl.resume" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["init_version"], state["init_digest"]  # a state from before either was kept: the path decides
    torch.save(state, state_file)
    began = Path(state["init"])  # the path of the last state written: the resume's own if it validated
    with pytest.raises(ValueError, match=r"--resume: the run began from another --init \(init \("):
        train_rl(tiny_dataset, init if began == elsewhere else elsewhere, out, config, resume=True, progress=False)
    assert train_rl(tiny_dataset, began, out, config, resume=True, progress=False)["steps"] == 3


def test_a_resume_killed_while_it_trims_the_step_log_keeps_it_whole(
    tiny_dataset: RecDataset, init_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resume rewrites the step log without the steps past its state: in one step (write_file), so a kill
    there leaves the old log; written in place, a kill left it empty and the next resume lost every step before."""
    out, steps_file = tmp_path / "rl", tmp_path / "rl.steps.jsonl"
    config = RLConfig(algo="grpo", max_steps=3, batch_size=4, eval_every=1, eval_limit=8, fusion_weight=0)
    interrupt_at_step(3, monkeypatch, lambda: train_rl(tiny_dataset, init_ckpt, out, config, progress=False))
    written = steps_file.read_text()

    def killed(path: Path, data: bytes) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(rl_run, "write_file", killed)
    with pytest.raises(KeyboardInterrupt):
        train_rl(tiny_dataset, init_ckpt, out, config, resume=True, progress=False)
    assert steps_file.read_text() == written


def test_resume_drops_a_cut_short_last_step_line_and_names_a_malformed_one(
    tiny_dataset: RecDataset,
    init_ckpt: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    out, steps_file = tmp_path / "rl", tmp_path / "rl.steps.jsonl"
    config = RLConfig(algo="grpo", max_steps=3, batch_size=4, eval_every=1, eval_limit=8, fusion_weight=0)
    interrupt_at_step(3, monkeypatch, lambda: train_rl(tiny_dataset, init_ckpt, out, config, progress=False))
    written = steps_file.read_text()
    first, second = written.splitlines(keepends=True)
    steps_file.write_text(first + '{"step": 1.5, "epo\n' + second)  # a damaged line that is not the last
    with pytest.raises(ValueError, match=rf"{steps_file}:2: not a step record"):
        train_rl(tiny_dataset, init_ckpt, out, config, resume=True, progress=False)
    assert steps_file.read_text() == first + '{"step": 1.5, "epo\n' + second  # left as it was
    steps_file.write_text(written + '{"step": 3, "epoch": 0, "rewa')  # killed while writing step 3's line
    with caplog.at_level("WARNING", logger="training.rl.run"):
        summary = train_rl(tiny_dataset, init_ckpt, out, config, resume=True, progress=False)
    assert "rl.steps.jsonl:3: dropping the last line, cut short" in caplog.text
    assert [json.loads(line)["step"] for line in steps_file.read_text().splitlines()] == [1, 2, 3]
    assert summary["steps"] == 3


def test_resumed_vstar_run_continues_to_the_same_weights(
    tiny_dataset: RecDataset, init_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupted V-STAR run (VED rollouts, value warm-up, value head and both optimizers), resumed, ends on
    the weights of the run that was never interrupted: resuming across sessions does not change results."""
    config = RLConfig(algo="vstar", max_steps=4, batch_size=4, eval_every=2, eval_limit=8, value_warmup=2, seed=3)

    def train(run: str, resume: bool = False) -> None:
        train_rl(tiny_dataset, init_ckpt, tmp_path / run, config, resume=resume, progress=False)

    train("full")
    interrupt_at_step(4, monkeypatch, lambda: train("part"))  # the state of step 2 is the last one saved
    train("part", resume=True)
    full, part = load_checkpoint(tmp_path / "full.resume"), load_checkpoint(tmp_path / "part.resume")
    a, b = full.policy.model.state_dict(), part.policy.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    va, vb = full.extras["value_head"], part.extras["value_head"]
    assert all(torch.equal(va[k], vb[k]) for k in va)

    def step_log(run: str) -> list[dict[str, Any]]:  # every figure but the wall time
        lines = (tmp_path / f"{run}.steps.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]

    assert step_log("part") == step_log("full")


def test_a_resumed_vstar_run_reports_what_the_uninterrupted_run_does(
    tiny_dataset: RecDataset, init_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The summary of an interrupted V-STAR run, resumed, is the uninterrupted run's but for wall times and
    paths: the value warm-up that ran before the interruption is reported (read back from the manifest), and
    s_per_step is over every step, those before the interruption included (from the resume state)."""
    config = RLConfig(algo="vstar", max_steps=3, batch_size=4, eval_every=2, eval_limit=8, value_warmup=2, seed=3)
    warmups = []
    real_warmup, real_step = RLTrainer.value_warmup_step, RLTrainer.step
    monkeypatch.setattr(RLTrainer, "value_warmup_step", lambda *a, **k: warmups.append(1) or real_warmup(*a, **k))

    def timed(self: RLTrainer, samples: list[Sample]) -> dict[str, float]:  # step n takes n seconds
        return real_step(self, samples) | {"seconds": float(self.step_count)}

    monkeypatch.setattr(RLTrainer, "step", timed)

    def train(run: str, resume: bool = False) -> dict[str, Any]:
        return train_rl(tiny_dataset, init_ckpt, tmp_path / run, config, resume=resume, progress=False)

    full = train("full")
    interrupt_at_step(3, monkeypatch, lambda: train("part"))  # after the validation of step 2
    assert len(warmups) == 2 * 2
    part = train("part", resume=True)
    assert len(warmups) == 2 * 2  # the resumed run does not warm up again

    def figures(summary: dict[str, Any]) -> dict[str, Any]:  # all but the wall times and the paths
        warmup = {k: v for k, v in summary["value_warmup"].items() if k != "seconds"}
        wall = ("seconds", "steps_log")
        return {k: v for k, v in summary.items() if k not in wall} | {"value_warmup": warmup}

    assert list(part) == list(full) and list(part["value_warmup"]) == ["steps", "seconds", "value_loss"]
    assert figures(part) == figures(full) and part["value_warmup"]["steps"] == 2
    assert part["s_per_step"] == full["s_per_step"] == 2.0  # (1 + 2 + 3) / 3, not step 3's alone
    assert part["step_seconds"] == full["step_seconds"] == 6.0  # the run's steps; "seconds" is the command's own
    assert load_checkpoint(tmp_path / "part").manifest["value_warmup"] == part["value_warmup"]


def test_a_run_whose_steps_all_score_below_the_init_says_so(
    tiny_dataset: RecDataset,
    init_ckpt: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The init is never the RL result; when it outscored every RL step on the selection rows the run warns."""
    import training.loop

    scores = iter([(0.5, 0.3), (0.2, 0.1), (0.25, 0.1)])  # step 0 (the init), then steps 1 and 2
    monkeypatch.setattr(training.loop, "selection_score", lambda *args: next(scores))
    config = RLConfig(max_steps=2, batch_size=4, eval_every=1, eval_limit=8, fusion_weight=0)
    with caplog.at_level("WARNING", logger="training.rl.run"):
        summary = train_rl(tiny_dataset, init_ckpt, tmp_path / "rl", config, progress=False)
    assert summary["below_init"] and summary["best"] == {"HR@10": 0.25, "NDCG@10": 0.1}
    assert load_checkpoint(tmp_path / "rl").manifest["selection"]["step"] == 2  # still the best RL step
    assert "no RL step beat the init" in caplog.text
    scores = iter([(0.5, 0.3), (0.5, 0.31)])
    summary = train_rl(tiny_dataset, init_ckpt, tmp_path / "rl2", replace(config, max_steps=1), progress=False)
    assert not summary["below_init"]


@pytest.mark.parametrize("given", [None, 2.5])
def test_rl_keeps_the_inits_fusion_weight_unless_given(
    tiny_dataset: RecDataset, tiny_policy: Policy, tmp_path: Path, given: float | None
) -> None:
    init = save_checkpoint(tmp_path / "init", tiny_policy, {"stage": "sft", "fusion": {"weight": 6.0}})
    config = RLConfig(algo="grpo", max_steps=1, batch_size=4, eval_limit=8, fusion_weight=given)
    summary = train_rl(tiny_dataset, init, tmp_path / "rl", config, progress=False)
    fusion = load_checkpoint(tmp_path / "rl").manifest["fusion"]
    assert fusion["weight"] == summary["fusion"]["weight"] == (6.0 if given is None else given)
    assert fusion["chosen_by"] == ("init" if given is None else "given")
    assert fusion["count_rows"] == 240  # train + all of valid (held out)
    with pytest.raises(ValueError, match="fusion_weight"):
        RLConfig(fusion_weight=-1.0)


@pytest.mark.parametrize("splits", [("train",), ("train", "valid"), ("valid",)])
def test_rl_counts_every_row_before_test_whichever_splits_it_trains_on(
    tiny_dataset: RecDataset, tiny_policy: Policy, tmp_path: Path, splits: tuple[str, ...]
) -> None:
    # SFT on train and RL on valid alone (rows SFT never saw) must not drop train from the fused counts
    init = save_checkpoint(tmp_path / "init", tiny_policy, {"stage": "sft", "fusion": {"weight": 6.0}})
    config = RLConfig(algo="grpo", max_steps=1, batch_size=4, eval_limit=8, train_splits=splits, holdout=10)
    summary = train_rl(tiny_dataset, init, tmp_path / "rl", config, progress=False)
    everything = len(tiny_dataset.samples(["train", "valid"]))
    assert summary["fusion"]["count_rows"] == everything == 240
    if splits == ("valid",):
        assert summary["train_rows"] == len(tiny_dataset.splits["valid"]) - 10
    # the service's popularity fallback counts the rows the fused counts are fit on before the held-out ones:
    # RL on valid alone keeps train's targets too
    train, valid = tiny_dataset.splits["train"], tiny_dataset.splits["valid"]
    counted = train if splits == ("train",) else [*train, *valid[:-10]]
    popular = load_checkpoint(tmp_path / "rl").manifest["popular_sids"]
    assert popular == [list(p) for p in popular_sids(tiny_dataset.catalog, counted)]


def test_a_run_that_held_nothing_out_reports_no_best_score(
    tiny_dataset: RecDataset, tiny_policy: Policy, tmp_path: Path
) -> None:
    init = save_checkpoint(tmp_path / "init", tiny_policy, {"stage": "sft", "fusion": {"weight": 6.0}})
    config = RLConfig(algo="grpo", max_steps=1, batch_size=4, eval_limit=8, train_splits=("valid",), holdout=0)
    summary = train_rl(tiny_dataset, init, tmp_path / "rl", config, progress=False)
    assert summary["selection_rows"] == 0 and summary["best"] is None and not summary["below_init"]  # not -1.0


def test_a_run_that_holds_nothing_out_never_writes_its_init_as_the_rl_result(
    tiny_dataset: RecDataset, tiny_policy: Policy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 0 scores the init and is never selected: with no held-out rows it was still kept, so a run stopped
    before its first RL validation left a copy of the SFT init at --out, over an earlier run's result."""
    init = save_checkpoint(tmp_path / "init", tiny_policy, {"stage": "sft", "fusion": {"weight": 6.0}})

    def stopped(self: RLTrainer, samples: list[Sample], counted: bool = True) -> dict[str, float]:
        raise KeyboardInterrupt

    monkeypatch.setattr(RLTrainer, "step", stopped)
    config = RLConfig(algo="grpo", max_steps=2, batch_size=4, eval_limit=8, train_splits=("valid",), holdout=0)
    with pytest.raises(KeyboardInterrupt):
        train_rl(tiny_dataset, init, tmp_path / "rl", config, progress=False)
    assert resume_folder(tmp_path / "rl").is_dir() and not (tmp_path / "rl").exists()


def test_the_lr_schedule_spans_every_epoch_of_the_run(
    tiny_dataset: RecDataset, tiny_policy: Policy, tmp_path: Path
) -> None:
    """Linear warm-up, then one cosine to 0 over the whole run (3 epochs of 4 batches: 30 rows of 8), not per
    epoch: each step's logged lr, the one its update used, follows the schedule step by step."""
    init = save_checkpoint(tmp_path / "init", tiny_policy, {"stage": "sft", "fusion": {"weight": 6.0}})
    config = RLConfig(
        algo="grpo", epochs=3, batch_size=8, lr=1e-3, warmup_ratio=0.25, eval_limit=4, train_splits=("valid",),
        holdout=10,
    )  # fmt: skip
    summary = train_rl(tiny_dataset, init, tmp_path / "rl", config, progress=False)
    total, warmup = 12, 3
    want = [(s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
            for s in range(total)]  # fmt: skip
    records = [json.loads(line) for line in Path(summary["steps_log"]).read_text().splitlines()]
    assert summary["steps"] == total and [r["epoch"] for r in records] == [0] * 4 + [1] * 4 + [2] * 4
    assert [r["lr"] for r in records] == pytest.approx([1e-3 * w for w in want])


def one_step_run(data: RecDataset, policy: Policy, tmp_path: Path, init_manifest: dict, **config) -> Path:
    """A one-step GRPO run (8 selection rows) from ``policy`` saved with ``init_manifest``; its checkpoint."""
    init = save_checkpoint(tmp_path / "init", policy, {"stage": "sft"} | init_manifest)
    train_rl(data, init, tmp_path / "rl", RLConfig(algo="grpo", max_steps=1, batch_size=4, eval_limit=8, **config),
             progress=False)  # fmt: skip
    return tmp_path / "rl"


def test_fuse_chooses_an_rl_checkpoints_weight_on_the_rows_its_run_held_out(
    tiny_dataset: RecDataset, tiny_policy: Policy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.evaluation.fusion as fusion_module

    rl = one_step_run(tiny_dataset, tiny_policy, tmp_path, {"fusion": {"weight": 6.0}}, train_splits=("valid",),
                      holdout=10)  # fmt: skip
    assert load_checkpoint(rl).manifest["fusion"]["chosen_by"] == "init"  # the init's 6
    seen: dict[str, list] = {}
    real_choose = fusion_module.choose_weight

    def choose_weight(checkpoint, counts, select_rows, train_rows, *rest):  # type: ignore[no-untyped-def]
        seen["select"], seen["counted"] = list(select_rows), list(train_rows)
        return real_choose(checkpoint, counts, select_rows, train_rows, *rest)

    monkeypatch.setattr(fusion_module, "choose_weight", choose_weight)
    fusion = fuse_rl_checkpoint(rl, tiny_dataset, weights=(0.0, 12.0), beams=10)
    valid = tiny_dataset.splits["valid"]
    assert seen["select"] == valid[-10:][:8]  # the first eval_limit of the rows the run held out
    assert seen["counted"] == [*tiny_dataset.splits["train"], *valid[:-10]]  # every row before them
    stored = load_checkpoint(rl).manifest["fusion"]
    assert stored["chosen_by"] == "held-out" and stored["weight"] == fusion["weight"] in (0.0, 12.0)
    assert [r["weight"] for r in stored["grid"]] == [0.0, 12.0]
    # the first eval_limit of the 10 held-out rows choose; the counts then hold every row before test
    assert fusion["selection_rows"] == 8 and fusion["count_rows"] == 240
    assert fusion["init_trained_on_selection_rows"] is None  # the init records no SFT config


def test_fuse_refuses_a_run_that_held_nothing_out_and_keeps_its_weight(
    tiny_dataset: RecDataset, tiny_policy: Policy, tmp_path: Path
) -> None:
    from training.sft.trainer import fuse_checkpoint

    rl = one_step_run(tiny_dataset, tiny_policy, tmp_path, {"fusion": {"weight": 6.0}}, train_splits=("valid",),
                      holdout=0)  # fmt: skip
    with pytest.raises(ValueError, match="no held-out rows .* keeps weight 6.0"):
        fuse_rl_checkpoint(rl, tiny_dataset)
    assert load_checkpoint(rl).manifest["fusion"]["weight"] == 6.0
    with pytest.raises(ValueError, match="not an RL checkpoint"):
        fuse_rl_checkpoint(tmp_path / "init", tiny_dataset)
    # an SFT refit likewise: its weight came from its held-out run
    fp = {"fingerprint": tiny_dataset.fingerprint()}
    refit = {"stage": "sft", "data": fp, "sft_config": {"train_splits": ["train", "valid"], "holdout": 0},
             "fusion": {"weight": 8.0, "chosen_by": "given"}}  # fmt: skip
    save_checkpoint(tmp_path / "refit", tiny_policy, refit)
    with pytest.raises(ValueError, match="a refit.* keeps weight 8.0"):
        fuse_checkpoint(tmp_path / "refit", tiny_dataset)
    assert load_checkpoint(tmp_path / "refit").manifest["fusion"]["weight"] == 8.0


def test_fuse_flags_selection_rows_the_init_trained_on(
    tiny_dataset: RecDataset, tiny_policy: Policy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # RL on train, selected on valid, from an SFT refit that trained on all of valid: every selection row
    refit = {"sft_config": {"train_splits": ["train", "valid"], "holdout": 0}, "fusion": {"weight": 6.0}}
    rl = one_step_run(tiny_dataset, tiny_policy, tmp_path, refit)
    fusion = fuse_rl_checkpoint(rl, tiny_dataset, weights=(0.0, 2.0), beams=10)
    assert fusion["init_trained_on_selection_rows"] == 8 == fusion["selection_rows"]
    assert "trained on 8 of the 8 selection rows" in caplog.text


def test_warmup_runs_first_and_the_checkpoint_keeps_its_ved_config(
    tiny_dataset: RecDataset, init_ckpt: Path, tmp_path: Path
) -> None:
    ved = VEDConfig(budget=40, explore_slots=2, init_beams=4)
    config = RLConfig(algo="vstar", max_steps=1, batch_size=4, eval_limit=8, value_warmup=3, ved_config=ved)
    summary = train_rl(tiny_dataset, init_ckpt, tmp_path / "v", config, progress=False)
    assert summary["value_warmup"]["steps"] == 3 and math.isfinite(summary["value_warmup"]["value_loss"])
    ckpt = load_checkpoint(tmp_path / "v")
    assert checkpoint_ved_config(ckpt, 16) == ved  # what eval / diagnose decode with
    assert checkpoint_ved_config(ckpt, 10, budget=30, seed=5) == VEDConfig(10, 4, 30, explore_slots=2, seed=5)
    assert checkpoint_ved_config(load_checkpoint(init_ckpt), 10) == VEDConfig(10)  # an SFT checkpoint: defaults


# ---- CLI contracts


def invoke(args: list[str]) -> str:
    from vstar import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def test_cli_rl_and_diagnose(tiny_data_dir: Path, init_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "grpo"
    data, init = str(tiny_data_dir), str(init_ckpt)
    invoke(["rl", "--data", data, "--init", init, "--out", str(out), "--algo", "grpo", "--max-steps", "1",
            "--batch-size", "4", "--eval-limit", "8", "--json", str(tmp_path / "rl.json")])  # fmt: skip
    summary = json.loads((tmp_path / "rl.json").read_text())
    assert summary["steps"] == 1 and summary["autocast"] is None  # auto: fp32 on the CPU
    invoke(["rl", "--data", data, "--init", init, "--out", str(tmp_path / "bf16"), "--algo", "grpo", "--max-steps",
            "1", "--batch-size", "4", "--eval-limit", "8", "--precision", "bf16",
            "--json", str(tmp_path / "b.json")])  # fmt: skip
    assert json.loads((tmp_path / "b.json").read_text())["autocast"] == "bfloat16"
    invoke(["diagnose", "--data", data, "--checkpoint", str(out), "--decoder", "beam", "--limit", "6",
            "--json", str(tmp_path / "d.json")])  # fmt: skip
    diag = json.loads((tmp_path / "d.json").read_text())
    assert (
        tuple(diag)[: len(DIAGNOSTIC_KEYS)]
        == DIAGNOSTIC_KEYS
        == ("reachability", "nonzero_adv_share", "reward_std", "distinct_l1", "tokens_per_prompt")
    )
    # then what was diagnosed, as vstar eval records it
    assert {k: diag[k] for k in ("rows", "split", "decoder", "num_candidates")} == {
        "rows": 6, "split": "valid", "decoder": "beam", "num_candidates": 16
    }  # fmt: skip
    # the tiny catalog's 6 first-level codes, then 16 beams of its 30 second-level prefixes (beam_tokens)
    assert diag["tokens_per_prompt"] == 6 + 16 and diag["nonzero_adv_share"] == diag["reachability"]
    invoke(["diagnose", "--data", data, "--checkpoint", str(out), "--decoder", "beam", "--budget", "64", "--limit", "6",
            "--json", str(tmp_path / "d64.json")])  # fmt: skip
    wide = json.loads((tmp_path / "d64.json").read_text())
    assert wide["tokens_per_prompt"] == 6 + 30  # every SID's beam, its 16 best: every prefix of both levels
    # a budget below what width G feeds (6 + 16) cannot be spent as asked: refused, not silently raised to G's
    from vstar import app

    short = CliRunner().invoke(app, ["diagnose", "--data", data, "--checkpoint", str(out), "--budget", "21"])
    assert short.exit_code == 2 and "budget 21 is below what beam search of width G = 16 feeds: 22" in short.output


def test_more_candidates_than_the_catalog_has_sids_are_refused(
    tiny_data_dir: Path, tiny_dataset: RecDataset, init_ckpt: Path, tmp_path: Path
) -> None:
    from vstar import app

    sids = len(tiny_dataset.catalog.sids)
    for args in (["rl", "--init", str(init_ckpt), "--out", str(tmp_path / "rl")], ["diagnose", "--checkpoint",
                 str(init_ckpt), "--json", str(tmp_path / "d.json")]):  # fmt: skip
        for g in (sids + 1, sids):  # a group of the whole catalog too: every target reached
            result = CliRunner().invoke(app, [*args, "--data", str(tiny_data_dir), "--num-candidates", str(g)])
            assert result.exit_code == 2, result.output
            assert f"--num-candidates {g} is not fewer than the {sids} SIDs of" in result.output
    assert not list(tmp_path.iterdir())  # refused before any work


def test_cli_fuse_takes_an_rl_checkpoint(tiny_data_dir: Path, init_ckpt: Path, tmp_path: Path) -> None:
    out, data = tmp_path / "grpo", str(tiny_data_dir)
    invoke(["rl", "--data", data, "--init", str(init_ckpt), "--out", str(out), "--algo", "grpo", "--max-steps", "1",
            "--batch-size", "4", "--eval-limit", "8", "--fusion-weight", "3"])  # fmt: skip
    invoke(["fuse", "--data", data, "--checkpoint", str(out), "--weights", "0,12", "--json", str(tmp_path / "f.json")])
    fusion = json.loads((tmp_path / "f.json").read_text())
    assert fusion["checkpoint"] == str(out) and fusion["chosen_by"] == "held-out" and fusion["selection_rows"] == 8
    assert load_checkpoint(out).manifest["fusion"]["weight"] == fusion["weight"]


def test_ved_on_a_checkpoint_without_value_head_is_a_clear_error(tiny_data_dir: Path, init_ckpt: Path) -> None:
    from models.checkpoint import CheckpointError
    from training.evaluation.decoders import make_decoder

    ckpt = load_checkpoint(init_ckpt)
    with pytest.raises((CheckpointError, ValueError), match="has no value head"):
        make_decoder(ckpt, "ved", 10, None)


def test_cli_bench_train_writes_both_keys(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    invoke(["bench", "train", "--steps", "1", "--batch-size", "2", "--threads", "0", "--json", str(out)])
    bench = json.loads(out.read_text())
    assert set(bench) == {"grpo_s_per_step", "vstar_s_per_step"} and all(v > 0 for v in bench.values())


def test_cli_bench_train_refuses_a_preset_it_would_not_time(tiny_data_dir: Path, init_ckpt: Path) -> None:
    """--preset small with --checkpoint timed the checkpoint's model, the JSON silent on it."""
    from vstar import app

    args = ["bench", "train", "--data", str(tiny_data_dir), "--checkpoint", str(init_ckpt), "--preset", "small"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "--preset builds the random model timed without --checkpoint" in " ".join(result.output.split())


def test_spearman_hand_cases() -> None:
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.0])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([3.0, 1.0, 2.0])) == pytest.approx(-0.5)
    # ties share their mean rank: ranks (0.5, 0.5, 2) vs (0, 1, 2)
    assert spearman(np.array([5.0, 5.0, 7.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(0.8660254)
    assert spearman(np.array([1.0, 1.0]), np.array([0.0, 1.0])) is None


def test_holdout_rows_are_the_last_ones() -> None:
    rows = list(range(10))
    assert list(select_rows(rows, None, 3, "valid")) == [7, 8, 9] and list(select_rows(rows, 2, 3, "valid")) == [7, 8]
    assert list(select_rows(rows, 2, None, "valid")) == [0, 1] and list(select_rows(rows, None, None, "valid")) == rows


@pytest.mark.parametrize("gamma", [0.99, 0.5])
def test_value_quality_of_a_head_that_knows_the_returns(
    tiny_policy: Policy, tiny_dataset: RecDataset, gamma: float
) -> None:
    """A stand-in head whose V is the dense return discounted by the run's gamma: rank correlation 1 at every
    level, and the target (the one complete SID with the full reward) first by V."""
    from training.rl.diagnose import ValueQuality
    from training.rl.rewards import batch_standard_rewards, batch_value_rewards
    from training.rl.rollout import sequences

    quality = ValueQuality(tiny_policy, new_value_head(tiny_policy), tiny_dataset.embeddings, gamma=gamma)
    rollout = collect(tiny_policy, tiny_dataset.splits["train"][:60], beam_source(16))
    batch, d = sequences(rollout), tiny_policy.catalog.depth
    _, rule = batch_standard_rewards(rollout.sid_index, rollout.target_sid)
    r = batch_value_rewards(
        rollout.token_ids, rollout.sid_index, rollout.target_tokens, rollout.target_item, rule, quality.sid_emb,
        quality.item_emb, quality.level_weights,
    )[batch.row, batch.col]  # fmt: skip
    returns = r.clone()
    for level in range(d - 1, -1, -1):
        returns[:, level] += gamma * returns[:, level + 1]

    class KnowsTheReturns(torch.nn.Module):
        def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.zeros(hidden.shape[0], hidden.shape[1] - d - 1), returns], dim=1)

    quality.head = KnowsTheReturns()  # type: ignore[assignment]
    quality.add(rollout)
    summary = quality.summary()
    assert summary["value_rows"] >= 1  # some groups reach their target
    assert summary["target_rank_value"] == 1.0 and summary["target_rank_logprob"] >= 1.0
    assert summary["value_spearman"] == pytest.approx(1.0)
    assert all(summary[f"value_spearman_l{lv}"] == pytest.approx(1.0) for lv in range(1, d))
    groups = [returns[batch.row == b, 0] for b in range(len(rollout.target_sid))]
    stds = [float(g.std()) for g in groups if len(g) > 1]
    assert summary["dense_return_std"] == pytest.approx(float(np.mean(stds))) and summary["dense_return_std"] > 0


def test_diagnose_scores_the_value_head_with_the_checkpoints_gamma(init_ckpt: Path) -> None:
    """``vstar diagnose`` discounts the dense returns by the gamma the RL run stored (RLConfig.gamma), as its
    level weights; the default where it stored none."""
    from training.rl.diagnose import checkpoint_gamma
    from training.rl.rewards import GAMMA

    ckpt = load_checkpoint(init_ckpt)
    assert checkpoint_gamma(ckpt) == GAMMA  # an SFT checkpoint
    ckpt.manifest["rl_config"] = {"gamma": 0.5}
    assert checkpoint_gamma(ckpt) == 0.5


def test_cli_diagnose_reports_the_value_head(tiny_data_dir: Path, tiny_policy: Policy, tmp_path: Path) -> None:
    """With a value head: the candidate-set keys as before, then its quality on the same candidate sets; VED
    decodes with the checkpoint's VED settings (here explore slots: more first-level codes than without)."""
    head = new_value_head(tiny_policy)
    manifest = {"stage": "rl", "value_head": value_head_manifest(head)}
    rl = asdict(RLConfig(algo="vstar", ved_config=VEDConfig(explore_slots=6)))
    extras = {"value_head": head.state_dict()}
    plain = save_checkpoint(tmp_path / "plain", tiny_policy, manifest, extras)
    explore = save_checkpoint(tmp_path / "x6", tiny_policy, manifest | {"rl_config": rl}, extras)
    out = {}
    for name, ckpt in (("plain", plain), ("x6", explore)):
        invoke(["diagnose", "--data", str(tiny_data_dir), "--checkpoint", str(ckpt), "--decoder", "ved",
                "--holdout", "12", "--batch-size", "4", "--json", str(tmp_path / f"{name}.json")])  # fmt: skip
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())
    diag = out["plain"]
    assert tuple(diag)[: len(DIAGNOSTIC_KEYS)] == DIAGNOSTIC_KEYS and set(VALUE_KEYS) <= set(diag)
    assert {"value_spearman_l1", "value_spearman_l2"} <= set(diag)
    assert diag["value_rows"] == round(diag["reachability"] * 12)
    assert diag["value_rows"] > 0  # the ranks below are measured, not skipped
    assert 1 <= diag["target_rank_value"] <= 16 and 1 <= diag["target_rank_logprob"] <= 16
    assert out["x6"]["distinct_l1"] > diag["distinct_l1"]
    # eval ranks a recommendation list by score unless told otherwise; diagnose kept the checkpoint's slots
    from training.data.dataset import load_dataset
    from training.evaluation.decoders import make_decoder
    from training.evaluation.evaluate import rank_samples

    ckpt = load_checkpoint(explore)
    rows = load_dataset(tiny_data_dir).splits["valid"][-12:]
    codes = {}
    for slots in (0, 6):
        ranked = rank_samples(ckpt.policy, rows, make_decoder(ckpt, "ved", 16, explore_slots=slots), progress=False)
        codes[slots] = sum(len({ckpt.policy.catalog.sids[i][0] for i in r}) for r in ranked)
    assert codes[6] > codes[0]


def test_vstar_on_sids_of_four_tokens(tmp_path: Path) -> None:
    """A catalog of four tokens per SID: V-STAR's dense reward takes the default weights for that depth, the run
    stores them, diagnose reads them back; weights of the wrong length stop the run before it trains."""
    from tests.conftest import make_catalog, write_random_dataset
    from training.rl.rewards import default_level_weights

    catalog = make_catalog(80, codes=(4, 3, 3, 3), seed=1)
    data = write_random_dataset(tmp_path / "d4", catalog, (60, 16, 8))
    init = save_checkpoint(tmp_path / "init", Policy.from_preset("tiny", catalog, seed=0), {"stage": "sft"})
    common = ["rl", "--data", str(data), "--init", str(init), "--algo", "vstar", "--max-steps", "1", "--batch-size",
              "4", "--eval-limit", "4", "--value-warmup", "1"]  # fmt: skip
    invoke([*common, "--out", str(tmp_path / "v")])
    stored = load_checkpoint(tmp_path / "v").manifest["rl_config"]["level_weights"]
    assert stored == pytest.approx(default_level_weights(4))
    invoke(["diagnose", "--data", str(data), "--checkpoint", str(tmp_path / "v"), "--decoder", "ved", "--limit", "4",
            "--json", str(tmp_path / "d.json")])  # fmt: skip
    assert set(VALUE_KEYS) <= set(json.loads((tmp_path / "d.json").read_text()))
    from tests.test_cli import assert_one_line_error
    from vstar import app

    result = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "w"), "--level-weights", "0.3,0.5,1"])
    assert_one_line_error(result.exit_code, result.output, "3 dense-reward level weights (0.3, 0.5, 1) for SIDs of 4")
    assert not (tmp_path / "w").exists()


def test_a_fresh_run_clears_an_earlier_runs_side_files_once_its_checks_pass(
    tiny_dataset: RecDataset, init_ckpt: Path, tmp_path: Path
) -> None:
    """Without --resume, an earlier run's step log, resume state, held-out run and default curves go before the
    new run writes; a fresh run refused by its checks (a budget the tree cannot fit) loses none of them."""
    names = ["rl.steps.jsonl", "rl.resume/manifest.json", "rl.heldout/manifest.json", "rl.tb/events.out.tfevents.0"]
    earlier = [tmp_path / name for name in names]
    for path in earlier:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('{"step": 1}\n')
    config = RLConfig(algo="grpo", max_steps=1, batch_size=4, eval_every=1, eval_limit=8)
    with pytest.raises(ValueError, match="budget 2 is below"):
        bad = replace(config, algo="vstar", ved_config=VEDConfig(budget=2))
        train_rl(tiny_dataset, init_ckpt, tmp_path / "rl", bad, progress=False, tensorboard=tmp_path / "rl.tb")
    assert all(p.read_text() == '{"step": 1}\n' for p in earlier)
    summary = train_rl(tiny_dataset, init_ckpt, tmp_path / "rl", config, progress=False, tensorboard=tmp_path / "rl.tb")
    assert [json.loads(line)["step"] for line in Path(summary["steps_log"]).read_text().splitlines()] == [1]
    assert not (tmp_path / "rl.heldout").exists() and not (tmp_path / "rl.tb" / "events.out.tfevents.0").exists()
    assert load_checkpoint(tmp_path / "rl.resume").trainer_state()["state"]["step"] == 1


@pytest.mark.parametrize(
    ("sft_splits", "rl_splits", "fitted"),
    [
        (("train",), ("train",), 200),
        (("train",), ("valid",), 0),
        (("train", "valid"), ("valid",), 30),
        (None, ("train",), None),
    ],
)
def test_a_run_on_rows_its_sft_init_fitted_is_warned(
    tiny_dataset: RecDataset,
    tiny_policy: Policy,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    sft_splits: tuple[str, ...] | None,
    rl_splits: tuple[str, ...],
    fitted: int | None,
) -> None:
    """RL on rows the SFT init trained on moved nothing in rounds 1 and 2 of docs/rl-experiments.md: the run says
    so at the start and counts them; an init without an SFT config (e.g. an RL checkpoint) is not guessed at."""
    manifest: dict[str, Any] = {"stage": "sft", "fusion": {"weight": 1.0}}
    if sft_splits is not None:
        manifest["sft_config"] = {"train_splits": list(sft_splits), "holdout": 10}
    init = save_checkpoint(tmp_path / "init", tiny_policy, manifest)
    config = RLConfig(algo="grpo", max_steps=1, batch_size=4, eval_limit=8, train_splits=rl_splits, holdout=10)
    with caplog.at_level("WARNING", logger="training.rl.run"):
        summary = train_rl(tiny_dataset, init, tmp_path / "rl", config, progress=False)
    assert summary["init_trained_on_train_rows"] == fitted
    assert ("RL on rows the SFT model had fitted" in caplog.text) == bool(fitted)


def test_an_rl_run_carries_its_datas_external_ids(
    tiny_policy: Policy, tiny_dataset: RecDataset, tmp_path: Path
) -> None:
    """From an init written before its data had item_map.json, the RL checkpoint names items as the data does;
    data without a map keeps the checkpoint's own (they name the same items)."""
    external = {i: f"SKU-{i}" for i in tiny_dataset.catalog.items}
    named = replace(tiny_dataset, catalog=tiny_dataset.catalog.with_external_ids(external))
    init = save_checkpoint(tmp_path / "init", tiny_policy, {"stage": "sft"})  # no external ids
    config = RLConfig(algo="grpo", max_steps=1, batch_size=4, eval_limit=8)
    train_rl(named, init, tmp_path / "rl", config, progress=False)
    assert load_checkpoint(tmp_path / "rl").policy.catalog.external_ids == external
    assert load_checkpoint(resume_folder(tmp_path / "rl")).policy.catalog.external_ids == external
    kept = load_checkpoint(tmp_path / "rl").policy
    carry_external_ids(kept, tiny_dataset)
    assert kept.catalog.external_ids == external


def test_the_logged_config_says_which_parts_of_v_star_the_run_uses() -> None:
    """GRPO's config holds sibling/ved/dense True (its defaults, ignored), which its log line alone read as VED."""
    assert RLConfig().parts_in_use() == "GRPO: beam-search groups, exact-match reward, no value head, no sibling term"
    assert RLConfig(algo="vstar").parts_in_use() == "V-STAR: VED groups, dense reward, value head, sibling term"
    ablated = RLConfig(algo="vstar", ved=False, dense=False, sibling=False)
    assert ablated.parts_in_use() == "V-STAR: beam-search groups, exact-match reward, value head, no sibling term"


def test_an_rl_init_is_followed_back_to_the_sft_model_it_descends_from(
    tiny_dataset: RecDataset, tmp_path: Path
) -> None:
    """RL from an RL checkpoint: the warnings about rows SFT trained on read the init's own manifest, which has
    no SFT config, so they said nothing (None); they now read the SFT model the chain of inits starts from."""
    from training.rl.rows import init_trained_on, root_sft_config

    def checkpoint(name: str, manifest: dict[str, Any]) -> str:
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
        return str(tmp_path / name)

    refit = {"train_splits": ["train", "valid"], "holdout": 0}
    sft = checkpoint("sft", {"stage": "sft", "sft_config": refit})
    rl2 = checkpoint("rl2", {"stage": "rl", "init": checkpoint("rl1", {"stage": "rl", "init": sft})})
    assert root_sft_config({"stage": "rl", "init": rl2}) == refit
    valid = tiny_dataset.splits["valid"][:8]
    assert init_trained_on(rl2, tiny_dataset, valid) == init_trained_on(sft, tiny_dataset, valid) == 8
    loop_a = str(tmp_path / "a")
    checkpoint("b", {"stage": "rl", "init": loop_a})
    checkpoint("a", {"stage": "rl", "init": str(tmp_path / "b")})
    gone = checkpoint("gone", {"stage": "rl", "init": str(tmp_path / "deleted")})
    assert init_trained_on(loop_a, tiny_dataset, valid) is None and init_trained_on(gone, tiny_dataset, valid) is None
    # rows an RL init trained on flatter a choice made on them too (SFT on train alone, RL1 on all of valid)
    sft_tr = checkpoint("sft_tr", {"stage": "sft", "sft_config": {"train_splits": ["train"], "holdout": 0}})
    on_valid = {"train_splits": ["valid"], "holdout": 0}
    rl_on_valid = checkpoint("rl_v", {"stage": "rl", "init": sft_tr, "rl_config": on_valid})
    assert init_trained_on(sft_tr, tiny_dataset, valid) == 0 and init_trained_on(rl_on_valid, tiny_dataset, valid) == 8
    assert root_sft_config({"stage": "rl", "init": rl_on_valid}) == {"train_splits": ["train"], "holdout": 0}
