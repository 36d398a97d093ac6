"""VED's settings: each bad value a ValueError naming its field, and a config survives a checkpoint's manifest.

A stored config is read back from JSON, which holds NaN and Infinity as well as numbers
(Python's ``json`` writes and reads them); ``VEDConfig`` is the one place that checks it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.checkpoint import LoadedCheckpoint
from models.policy import Policy
from models.ved_config import VEDConfig, checkpoint_ved_config

WEIGHTS = ("lam", "beta", "child_temperature", "value_weight")


@pytest.mark.parametrize("name", WEIGHTS)
@pytest.mark.parametrize("value", [-0.5, math.nan, math.inf, -math.inf])
def test_a_weight_out_of_range_names_its_field(name: str, value: float) -> None:
    """NaN and Infinity were accepted: a NaN beta stopped the search on an assertion, an infinite
    child_temperature drew an expanded code, a NaN or infinite value_weight returned no SID at all."""
    with pytest.raises(ValueError, match=f"^{name} must be a finite number >= 0, got {value!r}"):
        VEDConfig(**{name: value})


@pytest.mark.parametrize("value", ["soon", True, [1.0], math.nan])
def test_a_deadline_that_is_no_moment_is_an_error(value: object) -> None:
    """It was accepted, and a string failed at the search's first clock read, a TypeError."""
    with pytest.raises(ValueError, match="^deadline must be "):
        VEDConfig(deadline=value)  # type: ignore[arg-type]


def test_a_deadline_may_be_any_number() -> None:
    assert VEDConfig(deadline=0).deadline == 0 and VEDConfig(deadline=math.inf).deadline == math.inf


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_candidates", 0, "num_candidates must be >= 1, got 0"),
        ("init_beams", 2.0, "init_beams must be an integer, got 2.0"),
        ("expansions_per_step", 0, "expansions_per_step must be >= 1"),
        ("gate_patience", True, "gate_patience must be an integer, got True"),
        ("budget", 0, "budget must be >= 1, got 0"),
        ("budget", "64", "budget must be an integer, got '64'"),
        ("seed", 1.5, "seed must be an integer"),
        ("explore_slots", -1, "explore_slots must be in"),
        ("lam", "0.1", "lam must be a number, got '0.1'"),
    ],
)
def test_each_bad_setting_is_a_value_error_naming_its_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}"):
        VEDConfig(**{field: value})  # type: ignore[arg-type]


def weights() -> st.SearchStrategy[float | int]:
    return st.one_of(st.integers(0, 10), st.floats(0, 10, allow_nan=False, allow_infinity=False))


@st.composite
def configs(draw: st.DrawFn) -> VEDConfig:
    g = draw(st.integers(1, 64))
    return VEDConfig(
        num_candidates=g,
        init_beams=draw(st.integers(1, 64)),
        budget=draw(st.none() | st.integers(1, 10_000)),
        seed=draw(st.integers(-(2**40), 2**40)),
        expansions_per_step=draw(st.integers(1, 16)),
        gate_patience=draw(st.integers(1, 64)),
        explore_slots=draw(st.integers(0, g)),
        **{name: draw(weights()) for name in WEIGHTS},
    )


@settings(max_examples=80, deadline=None)
@given(configs(), st.integers(1, 64), st.none() | st.integers(1, 10_000), st.integers(0, 99))
def test_a_config_survives_the_checkpoint_manifest(
    tiny_policy: Policy, config: VEDConfig, g: int, budget: int | None, seed: int
) -> None:
    """What RL stores (``asdict``, written as JSON) reads back as the same config, and ``checkpoint_ved_config``
    gives it with G, the budget (when given) and the seed of the call."""
    stored = json.loads(json.dumps(asdict(config)))
    assert VEDConfig(**stored) == config
    loaded = LoadedCheckpoint(tiny_policy, {"rl_config": {"ved_config": stored}})
    got = checkpoint_ved_config(loaded, max(g, config.explore_slots), budget, seed)
    want = replace(config, num_candidates=max(g, config.explore_slots), seed=seed)
    assert got == (want if budget is None else replace(want, budget=budget))
