"""Micro-batching: concurrent requests share a decode, and each gets what it would get alone.

"Alone" is the app's own loaded model decoding that one history with the same
config. Also: the model runs off the event loop, so /healthz answers while a
decode is busy.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import torch
from fastapi.testclient import TestClient

from models.beam_search import BeamSearchConfig, beam_search
from models.policy import Policy
from models.sid_catalog import SidCatalog, sid_to_str
from service.app import create_app
from service.batcher import MicroBatcher
from service.settings import Settings


def decode_alone(policy: Policy, history: list[int], k: int) -> tuple[list[str], torch.Tensor]:
    ids, mask = policy.encode_prompts([[policy.catalog.sid_of(i) for i in history]])
    res = beam_search(policy.model, policy.trie, ids, mask, BeamSearchConfig(k))
    sids = [sid_to_str(policy.catalog.sids[s]) for s in res.sid_index[0].tolist() if s >= 0]
    return sids, res.scores[0][: len(sids)]


def post_together(client: TestClient, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(client.post, "/recommend", json=b) for b in bodies]
        return [f.result().json() for f in futures]


def test_concurrent_requests_are_batched_and_equal_decoding_alone(
    make_settings: Callable[..., Settings], tiny_catalog: SidCatalog
) -> None:
    rng = random.Random(5)
    ids = sorted(tiny_catalog.items)
    histories = [[rng.choice(ids) for _ in range(rng.randrange(1, 12))] for _ in range(12)]
    app = create_app(make_settings(batch_max_size=16, batch_max_wait_ms=300, cache_ttl_s=0))
    sizes: list[int] = []
    with TestClient(app) as c:
        batcher = app.state.recommender.batcher
        original = batcher.run

        def spy(key: Hashable, jobs: Sequence[object]) -> Sequence[object]:
            sizes.append(len(jobs))
            return original(key, jobs)

        batcher.run = spy
        responses = post_together(c, [{"history": h, "k": 7} for h in histories])
        batches = app.state.recommender.metrics.registry.get_sample_value("vstar_beam_batch_size_count")
        assert batches == len(sizes), (batches, sizes)  # one observation per beam decode
        policy = app.state.recommender.policy
    assert max(sizes) > 1, f"no batch formed: {sizes}"
    assert sum(sizes) == len(histories)
    for history, body in zip(histories, responses, strict=True):
        sids, scores = decode_alone(policy, history, 7)
        got = [(it["sid"], it["score"]) for it in body["items"]]
        assert [sid for sid, _ in got] == sids, (history, got, scores.tolist())
        torch.testing.assert_close(torch.tensor([s for _, s in got]), scores, rtol=1e-5, atol=1e-5)


def test_different_k_are_decoded_in_separate_groups(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(batch_max_size=8, batch_max_wait_ms=300, cache_ttl_s=0))
    groups: list[tuple[int, int]] = []  # (beam width, jobs) of every decode
    with TestClient(app) as c:
        batcher = app.state.recommender.batcher
        original = batcher.run

        def spy(key: Hashable, jobs: Sequence[object]) -> Sequence[object]:
            groups.append((key.num_beams, len(jobs)))  # type: ignore[attr-defined]
            return original(key, jobs)

        batcher.run = spy
        responses = post_together(c, [{"history": [3, 4], "k": k} for k in (2, 5, 2, 5)])
        policy = app.state.recommender.policy
    # however the arrivals fall into batches, each decode holds one k, and both k were decoded
    assert {width for width, _ in groups} == {2, 5} and sum(n for _, n in groups) == 4, groups
    for k, body in zip((2, 5, 2, 5), responses, strict=True):
        assert [it["sid"] for it in body["items"]] == decode_alone(policy, [3, 4], k)[0]


def test_unbatched_server_gives_the_same_answers(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(batch_max_size=1, cache_ttl_s=0))
    with TestClient(app) as c:
        body = c.post("/recommend", json={"history": [11, 12, 13], "k": 6}).json()
        policy = app.state.recommender.policy
    assert [it["sid"] for it in body["items"]] == decode_alone(policy, [11, 12, 13], 6)[0]


def test_health_answers_while_the_model_is_busy(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(cache_ttl_s=0))
    busy, release = threading.Event(), threading.Event()
    with TestClient(app) as c:
        batcher = app.state.recommender.batcher
        original = batcher.run

        def slow(key: Hashable, jobs: Sequence[object]) -> Sequence[object]:
            busy.set()
            release.wait(10)  # held until the probes below answered: they cannot wait for the model
            return original(key, jobs)

        batcher.run = slow
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(c.post, "/recommend", json={"history": [1], "k": 2})
            assert busy.wait(10)  # the decode has begun and holds the model thread
            assert c.get("/healthz").status_code == 200
            assert c.get("/readyz").status_code == 200
            assert not pending.done()
            release.set()
            assert pending.result().status_code == 200


def test_stopping_fails_the_jobs_in_hand_as_well_as_the_queued_ones() -> None:
    """A stop cancels the batcher's task: the jobs it had taken off the queue (here: in a decode that never
    returns in time) get the shutdown error like the ones still queued, instead of waiting forever."""
    started, release = threading.Event(), threading.Event()

    def run(key: Hashable, jobs: Sequence[int]) -> list[int]:
        started.set()
        release.wait(10)
        return list(jobs)

    async def scenario() -> list[BaseException | None]:
        with ThreadPoolExecutor(1) as pool:
            batcher: MicroBatcher[int, int] = MicroBatcher(run, pool, max_size=4, max_wait_s=0.0)
            batcher.start()
            decoding = batcher.enqueue("k", 1)
            assert await asyncio.to_thread(started.wait, 10)  # taken off the queue: its decode holds the thread
            queued = batcher.enqueue("k", 2)
            await batcher.stop()
            release.set()
            return [f.exception() if f.done() else None for f in (decoding, queued)]

    errors = asyncio.run(scenario())
    assert all(isinstance(e, RuntimeError) and str(e) == "server shutting down" for e in errors), errors


def test_a_job_that_left_while_an_earlier_group_decoded_is_never_decoded() -> None:
    """One batch, two groups: the second group's request is answered elsewhere (its client hung up, or the hard
    cap's timer answered it) while the first group decodes; its decode is then never run, as a queued one's."""
    started, release = threading.Event(), threading.Event()
    decoded: list[tuple[Hashable, list[int]]] = []

    def run(key: Hashable, jobs: Sequence[int]) -> list[int]:
        decoded.append((key, list(jobs)))
        started.set()
        release.wait(10)
        return list(jobs)

    async def scenario() -> tuple[int, bool]:
        with ThreadPoolExecutor(1) as pool:
            batcher: MicroBatcher[int, int] = MicroBatcher(run, pool, max_size=4, max_wait_s=0.0)
            batcher.start()
            first = batcher.enqueue("slow", 1)  # both queued before the batcher runs: one batch, two groups
            second = batcher.enqueue("other", 2)
            assert await asyncio.to_thread(started.wait, 10)  # the first group holds the model thread
            second.cancel()  # the client hung up meanwhile
            release.set()
            answer = await first
            await asyncio.sleep(0.05)  # the batcher's loop would have reached the second group by now
            await batcher.stop()
            return answer, second.cancelled()

    assert asyncio.run(scenario()) == (1, True)
    assert decoded == [("slow", [1])], decoded


def lane_batcher(run: Callable[[Hashable, Sequence[int]], list[int]], pool: Executor) -> MicroBatcher[int, int]:
    return MicroBatcher(run, pool, max_size=2, max_wait_s=0.0, lane=lambda key: key == "beam")


def test_lane_jobs_are_decoded_between_the_steps_of_a_running_group() -> None:
    """Beam jobs that arrive while a search holds the model thread are decoded when the search calls
    ``run_waiting`` and answered before it ends, in groups of at most ``max_size``; a job of another key that
    arrives meanwhile waits for the next batch, and one whose client left is not decoded."""
    started, arrived, release = threading.Event(), threading.Event(), threading.Event()
    decoded: list[tuple[Hashable, list[int]]] = []
    between: list[int] = []  # what each run_waiting decoded
    batcher: MicroBatcher[int, int]

    def run(key: Hashable, jobs: Sequence[int]) -> list[int]:
        decoded.append((key, list(jobs)))
        if key == "search":
            started.set()
            assert arrived.wait(10)
            between.append(batcher.run_waiting())  # between two of its steps
            assert release.wait(10)
        return [10 * j for j in jobs]

    async def scenario() -> tuple[list[int], bool, int, int]:
        nonlocal batcher
        with ThreadPoolExecutor(1) as pool:
            batcher = lane_batcher(run, pool)
            batcher.start()
            search = batcher.enqueue("search", 1)
            assert await asyncio.to_thread(started.wait, 10)
            beams = [batcher.enqueue("beam", j) for j in (2, 3, 4)]
            left = batcher.enqueue("beam", 5)
            left.cancel()  # its client hung up before the search's next step
            later = batcher.enqueue("search", 6)
            arrived.set()
            answers = [await asyncio.wait_for(b, 10) for b in beams]  # while the search still runs
            still_running = not search.done()
            release.set()
            first, second = await search, await later
            await batcher.stop()
            return answers, still_running, first, second

    answers, still_running, first, second = asyncio.run(scenario())
    assert answers == [20, 30, 40] and still_running and (first, second) == (10, 60)
    assert decoded == [("search", [1]), ("beam", [2, 3]), ("beam", [4]), ("search", [6])], decoded
    assert between == [3, 0]  # the three beams whose clients wait; nothing during the second search


def test_lane_jobs_left_when_the_group_ends_are_decoded_next_and_failures_reach_their_jobs() -> None:
    """A search that never calls ``run_waiting`` leaves the lane's jobs to the next batch; a lane decode that
    raises fails its jobs alone, and the search goes on."""
    started, release = threading.Event(), threading.Event()
    decoded: list[tuple[Hashable, list[int]]] = []
    between: list[int] = []  # what run_waiting says it decoded (vstar_beam_between_ved_total): a failure is not
    batcher: MicroBatcher[int, int]

    def run(key: Hashable, jobs: Sequence[int]) -> list[int]:
        decoded.append((key, list(jobs)))
        if key == "search":
            started.set()
            assert release.wait(10)
            if jobs == [7]:
                between.append(batcher.run_waiting())
        if key == "beam" and 99 in jobs:
            raise ValueError("bad beam")
        return list(jobs)

    async def scenario() -> tuple[list[int], BaseException | None]:
        nonlocal batcher
        with ThreadPoolExecutor(1) as pool:
            batcher = lane_batcher(run, pool)
            batcher.start()
            search = batcher.enqueue("search", 1)
            assert await asyncio.to_thread(started.wait, 10)
            waiting = batcher.enqueue("beam", 2)
            release.set()
            answers = [await search, await waiting]
            started.clear()
            release.clear()
            failing_search = batcher.enqueue("search", 7)
            assert await asyncio.to_thread(started.wait, 10)
            failing = batcher.enqueue("beam", 99)
            release.set()
            error = await asyncio.gather(failing, return_exceptions=True)
            answers.append(await failing_search)
            await batcher.stop()
            return answers, error[0]

    answers, error = asyncio.run(scenario())
    assert answers == [1, 2, 7] and isinstance(error, ValueError) and str(error) == "bad beam" and between == [0]
    assert decoded == [("search", [1]), ("beam", [2]), ("search", [7]), ("beam", [99])], decoded


def test_stopping_fails_the_jobs_in_the_lane() -> None:
    started, release = threading.Event(), threading.Event()

    def run(key: Hashable, jobs: Sequence[int]) -> list[int]:
        started.set()
        release.wait(10)
        return list(jobs)

    async def scenario() -> BaseException | None:
        with ThreadPoolExecutor(1) as pool:
            batcher = lane_batcher(run, pool)
            batcher.start()
            batcher.enqueue("search", 1)
            assert await asyncio.to_thread(started.wait, 10)
            beam = batcher.enqueue("beam", 2)
            await batcher.stop()
            release.set()
            return beam.exception() if beam.done() else None

    error = asyncio.run(scenario())
    assert isinstance(error, RuntimeError) and str(error) == "server shutting down"


def test_within_a_batch_the_lanes_groups_are_decoded_first() -> None:
    """A beam job collected in the same batch as a search that arrived before it does not wait for the search."""
    decoded: list[Hashable] = []

    def run(key: Hashable, jobs: Sequence[int]) -> list[int]:
        decoded.append(key)
        return list(jobs)

    async def scenario() -> list[int]:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(run, pool, max_size=4, max_wait_s=0.0, lane=lambda key: key == "beam")
            batcher.start()
            futures = [batcher.enqueue(key, j) for j, key in enumerate(("search", "other", "beam"))]  # one batch
            answers = [await f for f in futures]
            await batcher.stop()
            return answers

    assert asyncio.run(scenario()) == [0, 1, 2]
    assert decoded == ["beam", "search", "other"]


def test_lane_jobs_queued_before_a_group_starts_move_to_the_lane() -> None:
    """A beam job that queued after its batch formed (here: a batch of one) is moved to the lane when the
    batch's search starts, so the search's ``run_waiting`` decodes it; the job of another key stays queued."""
    decoded: list[tuple[Hashable, list[int]]] = []
    answered_inside: list[bool] = []
    batcher: MicroBatcher[int, int]

    def run(key: Hashable, jobs: Sequence[int]) -> list[int]:
        decoded.append((key, list(jobs)))
        if key == "search" and jobs == [1]:
            batcher.run_waiting()
            answered_inside.append(len(decoded) == 2)
        return list(jobs)

    async def scenario() -> list[int]:
        nonlocal batcher
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(run, pool, max_size=1, max_wait_s=0.0, lane=lambda key: key == "beam")
            batcher.start()
            futures = [batcher.enqueue(key, j) for j, key in ((1, "search"), (2, "other"), (3, "beam"))]
            answers = [await f for f in futures]
            await batcher.stop()
            return answers

    assert asyncio.run(scenario()) == [1, 2, 3]
    assert decoded == [("search", [1]), ("beam", [3]), ("other", [2])] and answered_inside == [True]


def test_lane_jobs_left_when_a_group_ends_are_decoded_before_the_jobs_queued_behind_them() -> None:
    """A beam job that the search's lane did not decode (the search never called ``run_waiting``: it fell back, or
    its deadline had passed) goes back to the head of the queue: at its tail it was decoded after the searches that
    queued after it, and under a steady VED load it could miss batch after batch."""
    started, release = threading.Event(), threading.Event()
    decoded: list[tuple[Hashable, list[int]]] = []

    def run(key: Hashable, jobs: Sequence[int]) -> list[int]:
        decoded.append((key, list(jobs)))
        if jobs == [1]:
            started.set()
            assert release.wait(10)
        return list(jobs)

    async def scenario() -> list[int]:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(run, pool, max_size=1, max_wait_s=0.0, lane=lambda key: key == "beam")
            batcher.start()
            futures = [batcher.enqueue("search", 1)]
            assert await asyncio.to_thread(started.wait, 10)  # the search holds the model thread
            futures.append(batcher.enqueue("beam", 2))  # to the lane
            futures += [batcher.enqueue("search", j) for j in (3, 4)]  # queued behind it
            release.set()
            answers = [await f for f in futures]
            await batcher.stop()
            return answers

    assert asyncio.run(scenario()) == [1, 2, 3, 4]
    assert decoded == [("search", [1]), ("beam", [2]), ("search", [3]), ("search", [4])], decoded


def test_lane_jobs_are_decoded_between_steps_only_until_the_search_says_stop() -> None:
    """``run_waiting(until=...)`` asks before each of its decodes: once the search's deadline has passed the
    lane's other groups wait for the search to end (they were all decoded, running the search past its deadline
    and its requests past their hard cap), then go first."""
    started, release = threading.Event(), threading.Event()
    decoded: list[tuple[Hashable, list[int]]] = []
    between: list[int] = []
    batcher: MicroBatcher[int, int]

    def run(key: Hashable, jobs: Sequence[int]) -> list[int]:
        decoded.append((key, list(jobs)))
        if key == "search" and jobs == [1]:
            started.set()
            assert release.wait(10)
            between.append(batcher.run_waiting(until=lambda: len(decoded) > 1))  # past it after one beam decode
            between.append(batcher.run_waiting(until=lambda: True))  # the search's next check
        return list(jobs)

    async def scenario() -> list[int]:
        nonlocal batcher
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(run, pool, max_size=1, max_wait_s=0.0, lane=lambda key: key != "search")
            batcher.start()
            futures = [batcher.enqueue("search", 1)]
            assert await asyncio.to_thread(started.wait, 10)
            futures += [batcher.enqueue(key, j) for key, j in (("beam", 2), ("wide", 3), ("beam", 4))]
            futures.append(batcher.enqueue("search", 5))
            release.set()
            answers = [await f for f in futures]
            await batcher.stop()
            return answers

    assert asyncio.run(scenario()) == [1, 2, 3, 4, 5]
    assert between == [1, 0], between
    assert decoded == [("search", [1]), ("beam", [2]), ("beam", [4]), ("wide", [3]), ("search", [5])], decoded


def test_closing_fails_the_lane_jobs_a_search_put_back_while_the_batcher_stopped() -> None:
    """A search's ``run_waiting`` that holds the lane's jobs when the stop drains the lane puts them back once its
    deadline has passed: the scheduler's close, after the model thread ends, fails those too."""
    from types import SimpleNamespace

    from service.decode_scheduler import DecodeScheduler

    started, arrived, holding, stopped = (threading.Event() for _ in range(4))
    batcher: MicroBatcher[int, int]

    def until() -> bool:  # asked with the beam in hand, not in the lane: the stop drains an empty lane
        holding.set()
        return stopped.wait(10)  # then the deadline has passed: the beam goes back to the lane

    def run(key: Hashable, jobs: Sequence[int]) -> list[int]:
        if key == "search":
            started.set()
            assert arrived.wait(10)
            batcher.run_waiting(until=until)
        return list(jobs)

    async def scenario() -> BaseException | None:
        nonlocal batcher
        pool = ThreadPoolExecutor(1)
        batcher = lane_batcher(run, pool)
        batcher.start()
        search = batcher.enqueue("search", 1)
        search.add_done_callback(lambda _: stopped.set())  # the stop answers it
        assert await asyncio.to_thread(started.wait, 10)  # the search holds the model thread: the lane is open
        beam = batcher.enqueue("beam", 2)
        arrived.set()
        assert await asyncio.to_thread(holding.wait, 10)
        await DecodeScheduler.close(SimpleNamespace(batcher=batcher, executor=pool))  # type: ignore[arg-type]
        return beam.exception() if beam.done() else None

    error = asyncio.run(scenario())
    assert isinstance(error, RuntimeError) and str(error) == "server shutting down", error


def test_a_stop_as_a_job_arrives_while_a_batch_waits_for_company_ends_the_batcher() -> None:
    """The batcher's task waits for company (``max_wait_s``); a stop that cancels it in the loop turn in which a job
    arrives ends it all the same (``asyncio.wait_for`` before Python 3.12 swallowed that cancel: the task went on
    and the stop waited for it forever), and every job, the one that just arrived too, gets the shutdown error."""

    def run(key: Hashable, jobs: Sequence[int]) -> list[int]:
        return list(jobs)

    async def scenario() -> tuple[bool, list[BaseException | None]]:
        with ThreadPoolExecutor(1) as pool:
            batcher: MicroBatcher[int, int] = MicroBatcher(run, pool, max_size=4, max_wait_s=60.0)
            batcher.start()
            futures = [batcher.enqueue("k", 1), batcher.enqueue("k", 2)]  # two: the batch waits for more
            for _ in range(5):
                await asyncio.sleep(0)  # the batcher has both in hand and waits for a third
            futures.append(batcher.enqueue("k", 3))  # its get completes in the turn the stop cancels the task
            stop = asyncio.ensure_future(batcher.stop())
            for _ in range(20):  # loop turns, not time: a stop that goes through needs a few
                await asyncio.sleep(0)
            stopped = stop.done()
            if not stopped:  # the cancel was swallowed: a second one ends the task, for the test's own end
                assert batcher._task is not None
                batcher._task.cancel()
                await stop
            return stopped, [f.exception() if f.done() else None for f in futures]

    stopped, errors = asyncio.run(scenario())
    assert stopped
    assert all(isinstance(e, RuntimeError) and str(e) == "server shutting down" for e in errors), errors
