"""A VED batch's split into shed jobs, initial-beam fallbacks and searched jobs, costed as the batch runs.

The decode's two parts are stubbed (they record which jobs each got) and the
learnt costs are set per batch bucket, in whole seconds, so the decision is the
only thing under test and a pause of the host between building a job and its
decode (milliseconds) cannot move it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from itertools import product
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.ved_config import VEDConfig
from service.deadline import BatchCost
from service.decode_scheduler import DecodeJob, DecodeRow
from service.settings import Settings
from service.ved_split import split_ved_group

# the fallbacks' initial beam and VED's initial tree, per batch bucket (seconds): batching makes the tree's
# extra prompts cheap, so a search of few prompts after a beam can cost more than the tree of the whole batch
BEAM = {1: 10.0, 2: 15.0, 4: 20.0, 8: 30.0}
TREE = {1: 30.0, 2: 32.0, 4: 60.0, 8: 90.0}


def costs(per_bucket: dict[int, float]) -> BatchCost:
    cost = BatchCost(start_s=1000.0)
    for batch, seconds in per_bucket.items():
        cost.set_baseline(batch, seconds)
    return cost


@pytest.fixture(scope="module")
def rec(make_settings: Callable[..., Settings]) -> Iterator[Any]:
    from service.app import load_recommender
    from service.metrics import ServiceMetrics

    rec = load_recommender(make_settings(warmup=False), ServiceMetrics())
    try:
        yield rec
    finally:
        rec.executor.shutdown(wait=True)


Split = tuple[list[str], list[str], list[str]]  # (searched, fallen back, shed), by job name


def split(rec: Any, monkeypatch: pytest.MonkeyPatch, jobs: dict[str, tuple[float | None, float | None]]) -> Split:
    """Decode ``jobs`` (name: (seconds to its deadline, seconds to its hard cap), None for none) as one VED
    group under the stubbed costs; the names each part got."""
    monkeypatch.setattr(rec, "beam_cost", costs(BEAM))
    monkeypatch.setattr(rec, "init_cost", costs(TREE))
    searched: list[DecodeJob] = []
    fallen: list[DecodeJob] = []

    def record(into: list[DecodeJob]) -> Callable[..., list[DecodeRow]]:
        def decode(config: VEDConfig, part: Sequence[DecodeJob], report: bool = True) -> list[DecodeRow]:
            into.extend(part)
            return [DecodeRow([0], [0.0], fallback=into is fallen)] * len(part)

        return decode

    monkeypatch.setattr(rec, "_ved", record(searched))
    monkeypatch.setattr(rec, "_initial_beam", record(fallen))
    now = time.perf_counter()
    built = {
        name: DecodeJob(
            (rec.catalog.sids[i],),
            deadline=None if soft is None else now + soft,
            answer_by=None if hard is None else now + hard,
        )
        for i, (name, (soft, hard)) in enumerate(jobs.items())
    }
    rows = rec.decode(rec.ved_settings, list(built.values()))
    names = {id(job): name for name, job in built.items()}
    shed = [name for name, row in zip(built, rows, strict=True) if row.shed]
    return [names[id(j)] for j in searched], [names[id(j)] for j in fallen], shed


def test_a_job_whose_tree_would_end_after_the_fallbacks_beam_and_its_deadline_falls_back(
    rec: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One urgent job falls back; the other's deadline (33 s) covers the tree of both (32 s), which the old rule
    asked, but not the fallback's beam (10 s) and then its own tree (30 s): searched, it ended past its
    deadline (and past its hard cap, 38 s: answered from popularity) instead of by the initial beam."""
    assert split(rec, monkeypatch, {"urgent": (5.0, 25.0), "late": (33.0, 38.0)}) == ([], ["urgent", "late"], [])


def test_a_job_whose_tree_fits_after_the_fallbacks_beam_is_searched(rec: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four kept jobs, one urgent: the old rule asked each for the tree of all four (60 s) and sent all four to the
    initial beam; the two with the most time have the fallbacks' beam (15 s) and a tree of two (32 s)."""
    jobs = {"urgent": (5.0, 25.0), "mid": (46.0, 56.0), "far1": (50.0, 60.0), "far2": (55.0, 65.0)}
    assert split(rec, monkeypatch, jobs) == (["far1", "far2"], ["urgent", "mid"], [])


def test_jobs_the_old_admission_shed_are_answered_by_the_beam_when_a_split_makes_their_cap(
    rec: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Admission asked every kept job to cover the beam of all kept (20 s for 3 or 4): the urgent two were shed.
    Two beams (15 s) make their caps, and the other two's tree (32 s) fits after them."""
    jobs = {"far1": (100.0, 110.0), "urgent1": (5.0, 16.0), "far2": (100.0, 110.0), "urgent2": (5.0, 16.0)}
    assert split(rec, monkeypatch, jobs) == (["far1", "far2"], ["urgent1", "urgent2"], [])


def test_a_lone_job_is_searched_if_its_tree_fits_else_falls_back_else_is_shed(
    rec: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alone, a job has no fallbacks' beam before its tree (30 s) nor others in its beam (10 s): as before."""
    assert split(rec, monkeypatch, {"a": (31.0, 40.0)}) == (["a"], [], [])
    assert split(rec, monkeypatch, {"a": (29.0, 40.0)}) == ([], ["a"], [])
    assert split(rec, monkeypatch, {"a": (5.0, 11.0)}) == ([], ["a"], [])
    assert split(rec, monkeypatch, {"a": (5.0, 9.0)}) == ([], [], ["a"])


def test_jobs_without_a_deadline_are_all_searched(rec: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``vstar recommend``'s offline batches: no deadline and no hard cap, none shed and none falling back,
    however dear the costs."""
    jobs: dict[str, tuple[float | None, float | None]] = {f"j{i}": (None, None) for i in range(5)}
    assert split(rec, monkeypatch, jobs) == (list(jobs), [], [])


Cost = Callable[[int], float]


def feasible(
    searched: list[int], fallen: list[int], to_deadline: list[float], to_cap: list[float], tree: Cost, beam: Cost
) -> bool:
    """The conditions of ``service.ved_split``, written out per job."""
    before = beam(len(fallen)) if fallen else 0.0
    return all(to_cap[i] >= before for i in fallen) and all(
        min(to_deadline[i], to_cap[i]) >= before + tree(len(searched)) for i in searched
    )


@given(
    caps=st.lists(st.floats(0, 100) | st.just(float("inf")), min_size=1, max_size=6),
    margin=st.floats(0, 20),
    tree_costs=st.lists(st.floats(0.1, 60), min_size=4, max_size=4),
    beam_costs=st.lists(st.floats(0.1, 30), min_size=4, max_size=4),
)
def test_the_split_answers_the_most_jobs_from_the_model_then_searches_the_most(
    caps: list[float], margin: float, tree_costs: list[float], beam_costs: list[float]
) -> None:
    """Against every assignment of the jobs to search, fallback and shed (deadlines one margin before the caps,
    as the service sets them; costs per bucket, not necessarily growing with it): the split meets its
    conditions, and none that meets them answers more jobs from the model, or as many and searches more."""
    deadlines = [c - margin for c in caps]

    def tree(n: int) -> float:
        return tree_costs[BatchCost.bucket(n).bit_length() - 1]

    def beam(n: int) -> float:
        return beam_costs[BatchCost.bucket(n).bit_length() - 1]

    got = split_ved_group(deadlines, caps, tree, beam)
    assert sorted(got.searched + got.fallen + got.shed) == list(range(len(caps)))
    assert feasible(got.searched, got.fallen, deadlines, caps, tree, beam)
    best = (0, 0)
    for parts in product("sfx", repeat=len(caps)):
        searched = [i for i, p in enumerate(parts) if p == "s"]
        fallen = [i for i, p in enumerate(parts) if p == "f"]
        if feasible(searched, fallen, deadlines, caps, tree, beam):
            best = max(best, (len(searched) + len(fallen), len(searched)))
    assert (len(got.searched) + len(got.fallen), len(got.searched)) == best
