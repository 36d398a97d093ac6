"""Paired bootstrap comparison of eval files (``training.evaluation.compare``, ``vstar compare``)."""

from __future__ import annotations

import json
import logging
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from training.evaluation.compare import METRICS, compare_runs, load_ranks, paired_bootstrap, row_metric
from vstar import app


def eval_file(path: Path, ranks: list[int | None], metrics: dict | None = None, **recorded: str) -> Path:
    """An eval file of ``ranks``; its metrics every compared one (a stand-in 0.0) but those given in ``metrics``."""
    figures = dict.fromkeys(METRICS, 0.0) | (metrics or {})
    path.write_text(json.dumps({"metrics": figures, "rows": len(ranks), "target_ranks": ranks} | recorded))
    return path


def test_row_metrics_follow_the_ranks() -> None:
    ranks = np.array([0, 2, 9, -1])
    assert row_metric(ranks, "HR@1").tolist() == [1, 0, 0, 0]
    assert row_metric(ranks, "HR@10").tolist() == [1, 1, 1, 0]
    assert row_metric(ranks, "NDCG@3").tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert row_metric(ranks, "NDCG@10")[2] == pytest.approx(1 / math.log2(11))


def test_identical_runs_differ_by_nothing() -> None:
    ranks = np.random.default_rng(0).integers(-1, 20, size=(2, 300))
    out = paired_bootstrap(ranks, ranks, samples=200)
    assert all(m["diff"] == 0 and m["ci95"] == [0, 0] for m in out.values())


def test_a_better_method_has_an_interval_above_zero_and_seeds_are_averaged() -> None:
    rng = np.random.default_rng(1)
    base = rng.integers(-1, 20, size=400)
    better = np.where(base > 0, base - 1, base)  # every ranked target one place higher
    out = paired_bootstrap(base[None], np.stack([better, better]), metrics=("HR@1", "NDCG@10"), samples=500)
    for m in out.values():
        assert m["diff"] > 0 and 0 < m["ci95"][0] <= m["diff"] <= m["ci95"][1]
        assert m["relative"] == pytest.approx(m["diff"] / m["base"], abs=2e-3)
        assert m["relative_ci95"] == pytest.approx([c / m["base"] for c in m["ci95"]], abs=2e-3)
    assert out["HR@1"]["other_seeds"] == {"mean": out["HR@1"]["other"], "std": 0.0, "seeds": 2}
    # two seeds: a row's figure is the seeds' mean
    half = paired_bootstrap(base[None], np.stack([base, better]), metrics=("HR@1",), samples=100)
    assert half["HR@1"]["diff"] == pytest.approx(out["HR@1"]["diff"] / 2, abs=1e-4)
    spread = half["HR@1"]["other_seeds"]
    hr1 = [float((base == 0).mean()), float((better == 0).mean())]
    assert spread["mean"] == pytest.approx(np.mean(hr1), abs=1e-4)
    assert spread["std"] == pytest.approx(np.std(hr1, ddof=1), abs=1e-4)


def test_files_must_hold_ranks_for_the_same_rows(tmp_path: Path) -> None:
    a = eval_file(tmp_path / "a.json", [0, None, 3])
    assert load_ranks([a]).tolist() == [[0, -1, 3]]
    b = eval_file(tmp_path / "b.json", [0, 1])
    with pytest.raises(ValueError, match="different numbers of rows"):
        load_ranks([a, b])
    (tmp_path / "old.json").write_text(json.dumps({"metrics": {}}))
    with pytest.raises(ValueError, match="no target_ranks"):
        load_ranks([tmp_path / "old.json"])


def test_runs_over_other_rows_are_refused_where_the_files_say_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    test_a = eval_file(tmp_path / "a.json", [0, 1], split="test", rows_fingerprint="f" * 64)
    valid = eval_file(tmp_path / "v.json", [0, 1], split="valid", rows_fingerprint="e" * 64)
    with pytest.raises(ValueError, match=r"different splits \(.*a.json: test; .*v.json: valid\)"):
        compare_runs([test_a], [valid])
    other_rows = eval_file(tmp_path / "b.json", [0, 1], split="test", rows_fingerprint="d" * 64)
    with pytest.raises(ValueError, match="different rows"):
        compare_runs([test_a], [other_rows])
    unrecorded = eval_file(tmp_path / "old.json", [1, 0])  # an older file: nothing recorded to check
    with caplog.at_level(logging.WARNING, logger="training.evaluation.compare"):
        assert compare_runs([test_a], [unrecorded])["rows"] == 2
    assert "old.json record no rows_fingerprint" in caplog.text and "a.json" not in caplog.text
    (tmp_path / "bin.json").write_bytes(b"\x80\x81")
    with pytest.raises(ValueError, match="bin.json: not a readable JSON file"):
        compare_runs([test_a], [tmp_path / "bin.json"])
    (tmp_path / "long.json").write_text('{"target_ranks": [1' + "0" * 5000 + "]}")  # past the reader's limit
    with pytest.raises(ValueError, match="long.json: not a readable JSON file"):
        compare_runs([test_a], [tmp_path / "long.json"])


def test_cli_writes_the_comparison_and_names_bad_files(tmp_path: Path) -> None:
    a = eval_file(tmp_path / "a.json", [5, None, 3, 0] * 10)
    b = eval_file(tmp_path / "b.json", [0, None, 3, 0] * 10)
    out = tmp_path / "cmp.json"
    result = CliRunner().invoke(app, ["compare", "--base", str(a), "--other", str(b), "--json", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert payload["rows"] == 40 and payload["metrics"]["HR@1"]["diff"] == 0.25
    assert payload["bootstrap_seed"] == 0 and payload["bootstrap_samples"] == 2000
    twice = ["compare", "--base", f"{a},{tmp_path}/../{tmp_path.name}/a.json", "--other", str(b)]
    result = CliRunner().invoke(app, twice)  # one run would count as two seeds
    assert result.exit_code == 2 and "--base names" in result.output and "more than once" in result.output
    result = CliRunner().invoke(app, ["compare", "--base", str(a), "--other", str(tmp_path / "nope.json")])
    assert result.exit_code == 2 and "nope.json" in result.output
    c = eval_file(tmp_path / "c.json", [0])
    result = CliRunner().invoke(app, ["compare", "--base", str(a), "--other", str(c)])
    assert result.exit_code == 2 and "rows" in result.output


def test_a_metric_a_file_did_not_measure_is_null_in_the_comparison(tmp_path: Path) -> None:
    # vstar eval --beams 5: HR@10 and NDCG@10 are null there, and its ranks stop at 4
    short = eval_file(tmp_path / "a.json", [0, 4, None, 2], {"HR@5": 0.75, "HR@10": None, "NDCG@10": None})
    full = eval_file(tmp_path / "b.json", [0, 7, 9, 2])
    out = compare_runs([short], [full], samples=100)["metrics"]
    assert list(out) == ["HR@1", "HR@3", "HR@5", "HR@10", "NDCG@3", "NDCG@5", "NDCG@10"]
    assert out["HR@10"] is None and out["NDCG@10"] is None  # not a gain of 0.5 for the longer list
    assert out["HR@5"]["diff"] == -0.25


def test_a_file_without_a_metric_is_refused_not_compared_from_its_ranks(tmp_path: Path) -> None:
    """A --beams 5 file stripped of its metrics: its ranks stop at 4, so compared from them alone it would lose
    HR@10 by every target the longer list ranks 5 to 9, though it never measured HR@10."""
    stripped = tmp_path / "short.json"
    stripped.write_text(json.dumps({"rows": 4, "target_ranks": [0, 4, None, 2], "metrics": {"HR@5": 0.75}}))
    full = eval_file(tmp_path / "full.json", [0, 7, 9, 2])
    with pytest.raises(ValueError, match=r"short.json: metrics has no HR@1, HR@3, HR@10, NDCG@3, NDCG@5, NDCG@10"):
        compare_runs([stripped], [full])


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"target_ranks": None}, "target_ranks is not a non-empty list"),
        ({"target_ranks": []}, "target_ranks is not a non-empty list"),
        ({"target_ranks": [0, "x"]}, "target_ranks holds 'x'"),
        ({"target_ranks": [0, -3]}, "target_ranks holds -3"),
        ({"target_ranks": [0, 1.5]}, "target_ranks holds 1.5"),
        ({"target_ranks": [0, 2**64]}, f"target_ranks holds {2**64}"),  # numpy's object array: a traceback
        ({"target_ranks": [0, 1], "metrics": None}, "metrics is not an object"),
        ({"target_ranks": [0, 1], "rows": 3}, "rows is 3 but target_ranks holds 2 ranks"),
        ({"target_ranks": [0, 1], "rows_fingerprint": None}, "rows_fingerprint is None, not a string"),
        ({"target_ranks": [0, 1], "split": ["test"]}, r"split is \['test'\], not a string"),
        ({"target_ranks": [0, 1]}, "metrics is not an object"),
        ({"target_ranks": [0, 1], "metrics": {"HR@1": 0.5}}, r"metrics has no HR@3, HR@5, HR@10, NDCG@3"),
        ({"target_ranks": [0, 1], "metrics": dict.fromkeys(METRICS, 0.5) | {"HR@5": "0.5"}}, "metrics HR@5 is '0.5'"),
        ({"target_ranks": [0, 1], "metrics": dict.fromkeys(METRICS, 0.5) | {"HR@3": True}}, "metrics HR@3 is True"),
    ],
)
def test_a_malformed_eval_file_is_a_one_line_error_naming_it(tmp_path: Path, payload: dict, message: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(payload))
    good = eval_file(tmp_path / "good.json", [0, 1])
    with pytest.raises(ValueError, match=message):
        compare_runs([good], [bad])
    result = CliRunner().invoke(app, ["compare", "--base", str(good), "--other", str(bad)])
    assert result.exit_code == 2 and "bad.json" in result.output and "Traceback" not in result.output


def test_a_base_that_never_hits_has_null_relative_figures_not_nan(tmp_path: Path) -> None:
    base = eval_file(tmp_path / "a.json", [None, 5, None, 7])  # HR@1 0: no relative figure
    other = eval_file(tmp_path / "b.json", [0, 5, None, 7])
    out = tmp_path / "cmp.json"
    result = CliRunner().invoke(app, ["compare", "--base", str(base), "--other", str(other), "--json", str(out)])
    assert result.exit_code == 0, result.output
    hr1 = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))["metrics"]["HR@1"]
    assert hr1["diff"] == 0.25 and hr1["relative"] is None and hr1["relative_ci95"] is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_interval_is_the_central_95_percent_of_draws_over_every_row(seed: int) -> None:
    """Three rows, only the last one a hit for the other method: a draw's mean difference is (hits drawn) / 3,
    and all three draws hit it with chance 1/27 = 3.7%: inside the upper 2.5% tail's cut (a 90% interval,
    5% to 95%, would end at 2/3), and never if the last row were never drawn."""
    base, other = np.array([[-1, -1, -1]]), np.array([[-1, -1, 0]])
    out = paired_bootstrap(base, other, metrics=("HR@1",), samples=2000, seed=seed)["HR@1"]
    assert out["diff"] == pytest.approx(1 / 3, abs=1e-4) and out["ci95"] == [0.0, 1.0]


def test_the_draws_are_made_in_blocks_of_bounded_memory_with_the_same_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """5,000 draws of 1,000 rows are 40 MB of row indices at once (and as much again per metric's draw): in
    blocks of 2**16 indices the peak stays near 1 MB, and a seed gives the same interval either way."""
    import training.evaluation.compare as compare

    ranks = np.random.default_rng(0).integers(-1, 20, size=(2, 1000))
    whole = paired_bootstrap(ranks[:1], ranks[1:], metrics=("HR@1", "NDCG@10"), samples=5000, seed=3)
    monkeypatch.setattr(compare, "DRAW_ELEMENTS", 1 << 16, raising=False)
    tracemalloc.start()
    try:
        blocks = paired_bootstrap(ranks[:1], ranks[1:], metrics=("HR@1", "NDCG@10"), samples=5000, seed=3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert blocks == whole
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB"
