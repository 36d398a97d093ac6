"""Baselines: popularity order, SASRec training contracts, eval-shaped output, the CLI and its errors."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from training.baselines.run import (
    popular_items,
    popularity,
    ranking_depth,
    run_pop,
    run_sasrec,
    sid_rankings,
)
from training.baselines.sasrec import (
    ItemIndex,
    SASRec,
    SASRecConfig,
    rank_items,
    sequence_loss,
    train_sasrec,
    training_tensors,
)
from training.data.dataset import RecDataset, Sample
from training.evaluation.decoders import beam_decoder
from training.evaluation.evaluate import evaluate, score_rankings
from training.evaluation.metrics import items_to_sid_ranking
from vstar import app

TINY = SASRecConfig(hidden=16, blocks=1, heads=2, dropout=0.0, epochs=2, batch_size=32, lr=1e-2, patience=1)


def test_popularity_counts_targets_or_all() -> None:
    rows = [Sample("a", (1, 2), 3), Sample("b", (2,), 3), Sample("c", (2, 2), 1)]
    assert popularity(rows) == {3: 2, 1: 1}
    assert popularity(rows, "all") == {1: 2, 2: 4, 3: 2}
    with pytest.raises(ValueError, match="pop counts"):
        popularity(rows, "views")


def test_pop_ranks_by_count(tiny_dataset: RecDataset) -> None:
    cat = tiny_dataset.catalog
    counts = popularity(tiny_dataset.splits["train"])
    items = popular_items(counts, cat)
    assert sorted(items) == sorted(cat.items)
    assert all((-counts[a], a) < (-counts[b], b) for a, b in pairwise(items))
    result = run_pop(tiny_dataset, "test", ["train"])
    assert result["rows"] == len(tiny_dataset.splits["test"])
    # the ranking is the same for every row: check it reproduces HR@50 by hand
    ranking = items_to_sid_ranking(items, cat, 50)
    targets = [cat.sid_index[cat.sid_of(s.target)] for s in tiny_dataset.splits["test"]]
    assert result["metrics"]["HR@50"] == sum(t in ranking for t in targets) / len(targets)


def test_item_rankings_fill_50_distinct_sids(tiny_dataset: RecDataset) -> None:
    cat = tiny_dataset.catalog
    depth = ranking_depth(cat)
    # worst case: every item that shares a SID comes first
    shared = [i for items in cat.items_of_sid if len(items) > 1 for i in items]
    order = shared + [i for i in sorted(cat.items) if i not in shared]
    (ranked,) = sid_rankings([order[:depth]], cat)
    assert len(ranked) == min(50, len(cat.sids)) == len(set(ranked))


def tiny_batch(tiny_dataset: RecDataset) -> tuple[SASRec, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    index = ItemIndex(tiny_dataset.catalog)
    inputs, labels = training_tensors(tiny_dataset.splits["train"][:32], index, TINY.max_history)
    return SASRec(len(index.item_ids), TINY), inputs, labels


@pytest.mark.parametrize("loss", ["ce", "bce"])
@pytest.mark.parametrize("loss_on", ["last", "all"])
def test_sasrec_step_lowers_loss_and_changes_params(tiny_dataset: RecDataset, loss: str, loss_on: str) -> None:
    config = replace(TINY, loss=loss, loss_on=loss_on)
    model, inputs, labels = tiny_batch(tiny_dataset)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def batch_loss() -> torch.Tensor:
        return sequence_loss(model, inputs, labels, config, torch.Generator().manual_seed(0))

    first = batch_loss()
    assert torch.isfinite(first)
    optimizer.zero_grad()
    first.backward()
    optimizer.step()
    assert batch_loss().item() < first.item()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert {"item_emb.weight", "pos_emb.weight", "final_norm.weight"} <= set(changed)
    assert torch.all(model.item_emb.weight[0] == 0), "the padding row must stay zero"


def test_sasrec_is_causal_and_handles_empty_history(tiny_dataset: RecDataset) -> None:
    model, inputs, _ = tiny_batch(tiny_dataset)
    model.eval()
    seq = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 5, 9, 2], [0] * 10])
    other = seq.clone()
    other[0, -1] = 7
    out, out_other = model(seq), model(other)
    assert torch.allclose(out[0, :-1], out_other[0, :-1]), "a later item changed an earlier position"
    assert torch.isfinite(out).all()
    (ranked,) = rank_items(model, [Sample("u", (), 3)], ItemIndex(tiny_dataset.catalog), 5)
    assert len(ranked) == 5


def test_sasrec_seed_is_deterministic_and_output_shaped_like_eval(tiny_dataset: RecDataset, tiny_policy) -> None:
    config = replace(TINY, max_steps=3)
    first = run_sasrec(tiny_dataset, "test", ["train"], config, progress=False)
    second = run_sasrec(tiny_dataset, "test", ["train"], config, progress=False)
    assert first["metrics"] == second["metrics"]
    assert first["sasrec"]["history"] == second["sasrec"]["history"]
    assert first["sasrec"]["steps"] == 3
    rows = tiny_dataset.splits["test"][:4]
    reference = evaluate(tiny_policy, rows, tiny_dataset.splits["train"], beam_decoder(5), progress=False)
    assert set(first["metrics"]) == set(reference["metrics"])
    assert {"metrics", "rows", "seconds"} <= set(first)
    assert first["rows"] == len(tiny_dataset.splits["test"])
    assert first["selection_rows"] == len(tiny_dataset.splits["valid"])


def test_sasrec_bce_trains_and_selects_on_recent_valid_rows(tiny_dataset: RecDataset) -> None:
    result = run_sasrec(tiny_dataset, "test", ["train", "valid"], replace(TINY, loss="bce", max_steps=2), 15, False)
    assert result["selection_rows"] == 15  # the most recent valid rows, held out of training as SFT does
    assert result["train_rows"] == len(tiny_dataset.splits["train"]) + len(tiny_dataset.splits["valid"]) - 15


@pytest.mark.parametrize("name", ["pop", "sasrec"])
def test_cli_writes_eval_shaped_json(tiny_data_dir: Path, tmp_path: Path, name: str) -> None:
    out = tmp_path / f"{name}.json"
    args = ["baseline", name, "--data", str(tiny_data_dir), "--json", str(out), "--train-splits", "train,valid"]
    if name == "sasrec":  # its own options: pop refuses them (test_cli_refuses_options_its_baseline_ignores)
        args += ["--epochs", "1", "--max-steps", "2", "--hidden", "16", "--seed", "3", "--holdout", "10"]
    threads = torch.get_num_threads()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == threads, "--threads must not leak out of the command"
    payload = json.loads(out.read_text())
    assert payload["baseline"] == name and payload["split"] == "test"
    assert payload["rows"] == 40 and 0.0 <= payload["metrics"]["HR@10"] <= payload["metrics"]["HR@50"] <= 1.0
    assert payload["seconds"] >= 0 and "NDCG@10" in payload["metrics"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["knn"], "'knn' is not one of 'pop', 'transition', 'sasrec'"),
        (["pop", "--split", "valid", "--train-splits", "train,valid"], "is trained on"),
        (["pop", "--train-splits", "train,test"], "test split"),
        (["pop", "--split", "future"], "'future' is not one of 'test', 'valid'"),
        (["sasrec", "--loss", "hinge"], "'hinge' is not one of 'ce', 'bce'"),
        (["sasrec", "--hidden", "10", "--heads", "3"], "divisible"),
        (  # it trained on none of valid without a word
            ["sasrec", "--train-splits", "train,valid", "--holdout", "40"],
            "no valid rows to train on: --holdout 40 holds out all 40 valid rows",
        ),
        (["sasrec", "--train-splits", "valid", "--holdout", "40"], "no training rows: --holdout 40 holds out all 40"),
    ],
)
def test_cli_rejects_bad_input(tiny_data_dir: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["baseline", *args, "--data", str(tiny_data_dir)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_sasrec_without_valid_rows_says_what_it_chooses_on(tiny_data_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "no_valid"
    shutil.copytree(tiny_data_dir, data)
    valid = data / "valid.csv"
    valid.write_text(valid.read_text().splitlines()[0] + "\n")
    result = CliRunner().invoke(app, ["baseline", "sasrec", "--data", str(data)])
    assert result.exit_code == 2, result.output
    assert "SASRec chooses its epoch on valid rows, and valid.csv of" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [  # each was accepted and ignored: a transition run "--holdout 100" held nothing out, its JSON silent on it
        (["transition", "--holdout", "100"], "--holdout is sasrec's: transition would ignore it"),
        (
            ["pop", "--window", "1", "--seed", "3"],
            "--window is transition's; --seed is sasrec's: pop would ignore them",
        ),
        (["sasrec", "--pop-counts", "all"], "--pop-counts is pop's: sasrec would ignore it"),
        (["transition", "--pop-counts", "targets"], "--pop-counts is pop's"),  # given, though equal to the default
    ],
)
def test_cli_refuses_options_its_baseline_ignores(
    tiny_data_dir: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "b.json"
    result = CliRunner().invoke(app, ["baseline", *args, "--data", str(tiny_data_dir), "--json", str(out)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and not out.exists()
    ok = CliRunner().invoke(app, ["baseline", "transition", "--window", "2", "--data", str(tiny_data_dir)])
    assert ok.exit_code == 0, ok.output  # a baseline's own option is taken


@pytest.mark.slow
def test_pop_on_industrial_matches_reference(shared_dataset: RecDataset) -> None:
    metrics = run_pop(shared_dataset, "test", ["train", "valid"])["metrics"]
    assert metrics["HR@10"] == pytest.approx(0.0728, abs=5e-4)
    assert metrics["NDCG@10"] == pytest.approx(0.0549, abs=5e-4)


def test_sasrec_returns_its_best_epoch_not_its_last(tiny_dataset) -> None:
    """Two epochs, the first scoring higher on the selection rows: the model returned is epoch 0's."""
    states, scores = [], iter([(0.3, 0.2), (0.1, 0.1)])

    def select_score(model: torch.nn.Module) -> tuple[float, float]:
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    config = replace(TINY, epochs=2, patience=2)
    model, summary = train_sasrec(tiny_dataset.catalog, tiny_dataset.splits["train"], select_score, config, False)
    assert summary["best"] == {"epoch": 0, "HR@10": 0.3, "NDCG@10": 0.2} and len(states) == 2
    returned = model.state_dict()
    assert all(torch.equal(returned[k], v) for k, v in states[0].items())
    assert any(not torch.equal(returned[k], v) for k, v in states[1].items())


def test_sasrec_defines_the_long_tail_by_every_row_of_its_training_splits(
    tiny_dataset: RecDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tail_share@10 of every row of a table (eval, pop, transition) counts the rows of --train-splits; SASRec
    counted its training rows less the --holdout block it selects on, so its tail was another set of items."""
    import training.baselines.run as baselines

    tails: list[list[Sample]] = []

    def scored(ranked: Any, rows: Any, train_rows: Any, catalog: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        tails.append(list(train_rows))
        return score_rankings(ranked, rows, train_rows, catalog, *args, **kwargs)

    monkeypatch.setattr(baselines, "score_rankings", scored)
    result = run_sasrec(tiny_dataset, "test", ["train", "valid"], replace(TINY, max_steps=1), 15, False)
    assert tails[-1] == tiny_dataset.samples(["train", "valid"])  # the test split's scoring: every row
    assert result["train_rows"] == len(tiny_dataset.samples(["train", "valid"])) - 15  # trained without the 15
