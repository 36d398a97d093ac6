"""Choosing the fusion weight on held-out rows and storing the counts (``training.evaluation.fusion``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from models.checkpoint import load_checkpoint, save_checkpoint
from models.policy import Policy
from models.transition import STATE_NAME, ShallowFusion, TransitionCounts
from models.value_head import value_head_for, value_head_manifest
from training.data.dataset import Sample
from training.evaluation.decoders import beam_decoder
from training.evaluation.evaluate import evaluate
from training.evaluation.fusion import REPORTED, choose_weight, fuse_trained, grid_edge_warning, refit_before
from vstar import app


def transitions_that_decide(dataset, n: int) -> tuple[list[Sample], list[Sample]]:
    """Training rows whose one-item histories always go x -> x + 1, and held-out rows that follow the same rule."""
    items = sorted(dataset.catalog.items)
    train = [Sample(f"t{i}", (items[i],), items[i + 1]) for i in range(n)]
    held = [Sample(f"h{i}", (items[i],), items[i + 1]) for i in range(n)]
    return train, held


def test_the_weight_with_the_best_mean_of_the_reported_metrics_wins(
    tiny_dataset, tiny_policy: Policy, caplog: pytest.LogCaptureFixture
) -> None:
    train, held = transitions_that_decide(tiny_dataset, 30)
    counts = TransitionCounts.fit((s.history, s.target) for s in train)
    ckpt = type("Ckpt", (), {"policy": tiny_policy})()
    choice = choose_weight(ckpt, counts, held, train, weights=(0.0, 12.0), beams=10)
    by_weight = {r["weight"]: r for r in choice["grid"]}
    for row in choice["grid"]:
        assert row["mean"] == pytest.approx(sum(row[k] for k in REPORTED) / len(REPORTED), abs=1e-3)
    # a random policy never finds x + 1 first; the counts (every held-out transition was observed) always do
    assert by_weight[12.0]["HR@1"] == 1.0 and by_weight[0.0]["HR@1"] < 0.5
    assert choice["weight"] == 12.0 and choice["selection_rows"] == 30
    # the grid's largest weight won alone: a larger one might win again, and the warning says how to try one
    assert "the grid's largest fusion weight, 12, scored best (held-out mean 1.0000)" in caplog.text
    assert "vstar fuse --weights 0,12,24,48" in caplog.text


def test_ties_go_to_the_smaller_weight(tiny_dataset, tiny_policy: Policy, caplog: pytest.LogCaptureFixture) -> None:
    train, held = transitions_that_decide(tiny_dataset, 10)
    counts = TransitionCounts.fit((s.history, s.target) for s in train)
    ckpt = type("Ckpt", (), {"policy": tiny_policy})()
    choice = choose_weight(ckpt, counts, held, train, weights=(20.0, 12.0), beams=10)  # the smaller one last
    assert choice["grid"][0]["mean"] == choice["grid"][1]["mean"] and choice["weight"] == 12.0
    # a grid where every weight ties chose nothing: said, with what to do (a small valid split turned fusion off)
    assert "every fusion weight scored the same (held-out mean 1.0000) on the 10 selection rows" in caplog.text
    assert "the smallest, 12, is kept; give the weight yourself (vstar sft / vstar rl --fusion-weight)" in caplog.text
    caplog.clear()
    choose_weight(ckpt, counts, held, train, weights=(0.0, 12.0), beams=10)  # the counts decide: no warning
    assert "scored the same" not in caplog.text


def test_a_largest_weight_that_ties_a_smaller_one_is_no_edge() -> None:
    grid = [{"weight": w, "mean": m} for w, m in ((0.0, 0.1), (4.0, 0.3), (12.0, 0.3))]
    assert grid_edge_warning(grid) is None  # the tie keeps 4
    assert grid_edge_warning(grid[:2]) is not None and grid_edge_warning(grid[:1]) is None
    assert grid_edge_warning([{"weight": 12.0, "mean": 0.4}, {"weight": 0.0, "mean": 0.1}]) is not None  # any order


def test_choosing_needs_held_out_rows_and_valid_weights(tiny_dataset, tiny_policy: Policy) -> None:
    train, held = transitions_that_decide(tiny_dataset, 5)
    counts = TransitionCounts.fit((s.history, s.target) for s in train)
    ckpt = type("Ckpt", (), {"policy": tiny_policy})()
    with pytest.raises(ValueError, match="held-out rows"):
        choose_weight(ckpt, counts, [], train)
    with pytest.raises(ValueError, match=">= 0"):
        choose_weight(ckpt, counts, held, train, weights=(1.0, -1.0))


def test_stored_counts_include_the_held_out_rows(tiny_dataset, tiny_policy: Policy, tmp_path: Path) -> None:
    train, held = transitions_that_decide(tiny_dataset, 20)
    path = tmp_path / "ckpt"
    save_checkpoint(path, tiny_policy, {"stage": "sft"})
    extra = Sample("late", (train[0].history[0],), train[5].target)  # held out beyond the scored rows
    fusion = fuse_trained(path, None, train, [*held, extra], eval_limit=20, weights=(0.0, 12.0), beams=10)
    assert fusion["weight"] == 12.0 and fusion["selection_rows"] == 20 and fusion["count_rows"] == 41
    stored = TransitionCounts.from_state(load_checkpoint(path).extras[STATE_NAME])
    x = train[0].history[0]
    assert stored.counts[x] == {train[0].target: 2, train[5].target: 1}  # train + held-out + the late row


def test_a_given_weight_is_stored_without_scoring(tiny_dataset, tiny_policy: Policy, tmp_path: Path) -> None:
    train, _ = transitions_that_decide(tiny_dataset, 8)
    path = tmp_path / "ckpt"
    save_checkpoint(path, tiny_policy, {"stage": "sft"})
    fusion = fuse_trained(path, 2.5, train, [])
    loaded = load_checkpoint(path)
    assert loaded.manifest["fusion"] == {"weight": 2.5, "chosen_by": "given", "count_rows": 8, "transition_pairs": 8}
    assert fusion == loaded.manifest["fusion"]  # what a resumed refit reports of its held-out run
    assert TransitionCounts.from_state(loaded.extras[STATE_NAME]).num_pairs == 8


def test_eval_on_valid_fuses_with_counts_of_the_rows_before_the_scored_ones(
    tiny_dataset, tiny_data_dir: Path, tiny_policy: Policy, tmp_path: Path
) -> None:
    """A checkpoint's counts are fit on every row before test (train + valid, as fuse_trained stores them): on
    valid rows they would hold each scored row's own answer, so eval fits them again on the rows before the scored
    ones (train, and valid's rows before a --holdout block), as the fusion weight was chosen; train rows, which
    have no rows before them, are scored with the stored counts and a warning."""
    path = tmp_path / "ckpt"
    save_checkpoint(path, tiny_policy, {"stage": "sft"})
    fuse_trained(path, 2.0, tiny_dataset.samples(["train"]), tiny_dataset.splits["valid"])
    base = ["eval", "--data", str(tiny_data_dir), "--checkpoint", str(path), "--beams", "5", "--limit", "10"]
    train, valid = tiny_dataset.splits["train"], tiny_dataset.splits["valid"]
    stored = TransitionCounts.from_state(load_checkpoint(path).extras[STATE_NAME])
    assert all(stored.counted(s.history, s.target) for s in valid[-10:])  # each one's own answer
    for holdout, rows, before in (([], valid[:10], train), (["--holdout", "10"], valid[-10:], [*train, *valid[:-10]])):
        out = tmp_path / "v.json"
        r = CliRunner().invoke(app, [*base, "--split", "valid", *holdout, "--json", str(out)])
        assert r.exit_code == 0 and "warning" not in r.stderr, r.output
        got = json.loads(out.read_text())
        assert got["own_transitions_counted"] is None and got["fusion_weight"] == 2.0
        assert got["fusion_counts"] == f"refit on the {len(before)} rows before the scored ones"
        fused = ShallowFusion(TransitionCounts.fit((s.history, s.target) for s in before), 2.0)
        expected = evaluate(tiny_policy, rows, tiny_dataset.samples(["train"]), beam_decoder(5, fused))
        assert got["metrics"] == expected["metrics"] and got["rows_fingerprint"] == expected["rows_fingerprint"]
    r = CliRunner().invoke(app, [*base, "--split", "train", "--json", str(tmp_path / "t.json")])
    assert r.exit_code == 0 and "own transition (last history item -> target) of 10 of the 10 train rows" in r.stderr
    got = json.loads((tmp_path / "t.json").read_text())
    assert got["own_transitions_counted"] == 10 and got["fusion_counts"] == "checkpoint"
    for args in (["--split", "test"], ["--split", "valid", "--fusion-weight", "0"]):
        quiet = CliRunner().invoke(app, [*base, *args, "--json", str(tmp_path / "q.json")])
        assert quiet.exit_code == 0 and "warning" not in quiet.stderr, quiet.output
        assert json.loads((tmp_path / "q.json").read_text())["own_transitions_counted"] is None


def test_eval_on_another_data_sets_rows_fuses_with_counts_of_its_own_rows_before_them(
    tiny_dataset, tiny_data_dir: Path, tiny_policy: Policy, tmp_path: Path
) -> None:
    """A checkpoint's stored counts are its own data's: on a data set of the same catalog whose splits were drawn
    again (an import with another --split), its test rows may be counted there, each with its own answer, and the
    fused figures came out inflated with nothing said. Counts of this data's rows before the scored ones fuse."""
    path = tmp_path / "ckpt"
    other = {"name": "other", "fingerprint": "0" * 16, "content": "1" * 16}
    save_checkpoint(path, tiny_policy, {"stage": "sft", "data": other})
    test = tiny_dataset.splits["test"]
    fuse_trained(path, 2.0, [*tiny_dataset.samples(["train", "valid"]), *test], [])  # the scored rows' answers
    out = tmp_path / "t.json"
    base = ["eval", "--data", str(tiny_data_dir), "--checkpoint", str(path), "--beams", "5", "--limit", "10"]
    r = CliRunner().invoke(app, [*base, "--json", str(out)])
    assert r.exit_code == 0, r.output
    before, name = tiny_dataset.samples(["train", "valid"]), tiny_dataset.name
    note = f"note: {path} was trained on other data than {name!r} (fingerprints differ): its transition counts could"
    assert note in r.stderr and f"fit again on this data's {len(before)} rows before the scored ones" in r.stderr
    got = json.loads(out.read_text())
    assert got["fusion_counts"] == (
        f"refit on the {len(before)} rows before the scored ones of {name}: the checkpoint's counts are another data "
        "set's"
    )
    fused = ShallowFusion(TransitionCounts.fit((s.history, s.target) for s in before), 2.0)
    expected = evaluate(tiny_policy, test[:10], tiny_dataset.samples(["train"]), beam_decoder(5, fused))
    assert got["metrics"] == expected["metrics"]


def test_a_rank_other_than_0_reads_the_checkpoint_only_to_choose(
    tiny_dataset, tiny_policy: Policy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Rank 0 rewrites the checkpoint; with no choice to make (no collective holds it back) a rank that read the
    checkpoint meanwhile could catch it mid-replace, and it needs none of it: the weight is given, or nothing was
    held out (whose warning rank 0 alone gives)."""
    import logging

    import training.evaluation.fusion as fusion_module

    train, held = transitions_that_decide(tiny_dataset, 8)
    path = tmp_path / "ckpt"
    save_checkpoint(path, tiny_policy, {"stage": "sft"})
    loads: list[Path] = []
    monkeypatch.setattr(fusion_module, "load_checkpoint", lambda p, device="cpu": loads.append(p) or load_checkpoint(p))
    monkeypatch.setattr(fusion_module, "is_main", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert fuse_trained(path, 2.5, train, held)["weight"] == 2.5
        assert fuse_trained(path, None, train, [])["weight"] == 0.0
    assert loads == [] and "fusion" not in load_checkpoint(path).manifest  # rank 0 writes
    assert not caplog.records
    fuse_trained(path, None, train, held, weights=(0.0,), beams=10)  # a choice: every rank scores its slice
    assert loads == [path]


def test_eval_fuses_ved_at_the_checkpoints_weight_as_beam(
    tiny_dataset, tiny_data_dir: Path, tiny_policy: Policy, tmp_path: Path
) -> None:
    """Either decoder ranks as served: fused at the checkpoint's weight unless --fusion-weight says otherwise."""
    head = value_head_for(tiny_policy)
    path = tmp_path / "ckpt"
    save_checkpoint(path, tiny_policy, {"value_head": value_head_manifest(head)}, {"value_head": head.state_dict()})
    fuse_trained(path, 2.0, tiny_dataset.samples(["train"]), tiny_dataset.splits["valid"])
    base = ["eval", "--data", str(tiny_data_dir), "--checkpoint", str(path), "--decoder", "ved", "--beams", "5"]
    for extra, weight in (([], 2.0), (["--fusion-weight", "0"], 0.0), (["--fusion-weight", "3"], 3.0)):
        out = tmp_path / "ved.json"
        run = CliRunner().invoke(app, [*base, "--split", "test", "--limit", "6", *extra, "--json", str(out)])
        assert run.exit_code == 0, run.output
        report = json.loads(out.read_text())
        # the budget it searched with: VEDConfig's rule for 5 SIDs of depth 3 (the checkpoint stores none): the
        # least that fits the initial tree, 2 x 16 init beams, above 2 x (2 levels x 5)
        assert report["fusion_weight"] == weight and report["budget"] == 32


def test_eval_of_a_weight_without_counts_says_how_to_score_unfused(
    tiny_data_dir: Path, tiny_policy: Policy, tmp_path: Path
) -> None:
    path = save_checkpoint(tmp_path / "ckpt", tiny_policy, {"fusion": {"weight": 2.0}})
    run = CliRunner().invoke(app, ["eval", "--data", str(tiny_data_dir), "--checkpoint", str(path), "--limit", "2"])
    assert run.exit_code != 0 and "no transition counts" in run.output and "--fusion-weight 0" in run.output


def test_counts_refit_before_the_scored_rows_keep_the_stored_window() -> None:
    rows = [Sample("u", (1, 2, 3), 4), Sample("v", (5,), 6)]
    fusion = ShallowFusion(TransitionCounts.fit([(s.history, s.target) for s in rows], window=1), 2.0)
    refit = refit_before(fusion, rows[:1])
    assert refit.counts.window == 1 and refit.weight == 2.0
    assert refit.counts.scores([3, 9]) == {}  # the default window of 3 would score 4 at 1/2 (3 -> 4, 3 is 2nd)


@pytest.mark.parametrize(
    ("weights", "message"), [("", "Invalid value for --weights: empty list"), ("2,-1", "fusion weights must be >= 0")]
)
def test_fuse_refuses_an_empty_or_negative_grid_before_it_reads_anything(
    tiny_data_dir: Path, tmp_path: Path, weights: str, message: str
) -> None:
    """``--weights ""`` is not the default grid, and a negative weight is refused before the checkpoint is read
    (here it does not even exist)."""
    args = ["fuse", "--data", str(tiny_data_dir), "--checkpoint", str(tmp_path / "gone"), "--weights", weights]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
