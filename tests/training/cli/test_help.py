"""The help of options that a command refuses in some of its modes says which mode reads them."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from training.cli.baselines import OWN_OPTIONS
from training.cli.rl import VSTAR_OPTIONS
from training.rl.config import EXPLORE_SLOTS, VALUE_WARMUP
from vstar import app


def option_help(command: str, flag: str) -> str:
    params = typer.main.get_command(app).commands[command].params  # type: ignore[attr-defined]
    return next(p.help for p in params if flag in p.opts)


def test_each_baselines_own_options_are_marked_with_its_name() -> None:
    """``vstar baseline pop --seed 1`` is refused as "--seed is sasrec's": the help says so first (--epochs,
    --seed and --holdout read as the shared options of sft and rl, which every baseline would take)."""
    for owner, flags in OWN_OPTIONS.items():
        for flag in flags.values():
            assert option_help("baseline", flag).startswith(f"{owner}: "), flag


def test_vstar_only_options_of_rl_say_so() -> None:
    """``vstar rl --algo grpo --w-sib 2`` is refused as a V-STAR option: its help says V-STAR."""
    for flag in VSTAR_OPTIONS.values():
        assert "V-STAR" in option_help("rl", flag), flag


def test_rl_help_shows_the_defaults_it_leaves_to_rlconfig() -> None:
    """Their default is None on the command line (RLConfig's constants are not imported before torch): the
    help states the numbers, which must be RLConfig's."""
    assert f"(default: {EXPLORE_SLOTS})" in option_help("rl", "--explore-slots")
    assert f"(default: {VALUE_WARMUP};" in option_help("rl", "--value-warmup")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--lr", "-1"], "Invalid value for '--lr'"),
        (["--weight-decay", "-0.1"], "Invalid value for '--weight-decay'"),
        (["--dropout", "1.5"], "Invalid value for '--dropout'"),
        (["--lr", "0"], "lr must be > 0"),
        (["--hidden", "7", "--heads", "2"], "hidden (7) must be divisible by heads (2)"),
    ],
)
def test_sasrec_settings_are_checked_before_the_data_loads(options: list[str], message: str, tmp_path: Path) -> None:
    """As sft's: a bad SASRec setting is refused before the data set loads (seconds on the real one); the
    data folder here does not exist, which would be reported instead had it been read first. The float options
    show their range in the help, as sft's do."""
    result = CliRunner().invoke(app, ["baseline", "sasrec", "--data", str(tmp_path / "gone"), *options])
    assert result.exit_code == 2 and message in result.output and "gone" not in result.output, result.output
