"""A client that hangs up while its request waits for the model costs the model nothing.

Nothing in Starlette or uvicorn cancels a handler when its client goes: without
the route's own watch, a beam request whose client timed out (and, typically,
retried) was still decoded, so an overloaded server spent its model time on
answers nobody would read.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from fastapi.testclient import TestClient
from starlette.types import Message

from service.app import create_app
from service.decode_scheduler import DecodeJob
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.store_calls import StoreCalls


def test_a_request_whose_client_hung_up_is_not_decoded(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(cache_ttl_s=0, batch_max_size=1))
    decoded: list[tuple[Any, ...]] = []
    with TestClient(app) as client:
        batcher, policy = app.state.recommender.batcher, app.state.recommender.policy
        original = batcher.run
        busy_decoding = threading.Event()

        def slow(key: Hashable, jobs: Sequence[DecodeJob]) -> Sequence[object]:
            decoded.extend(j.history for j in jobs)
            busy_decoding.set()
            time.sleep(0.6)  # the model is busy: the next request queues
            return original(key, jobs)

        batcher.run = slow
        busy = threading.Thread(target=client.post, args=("/recommend",), kwargs={"json": {"history": [1], "k": 3}})
        busy.start()
        assert busy_decoding.wait(10)  # the first decode runs (a fixed sleep raced a slow start on a busy host)

        async def hang_up() -> list[Message]:
            body = json.dumps({"history": [2, 4], "k": 3}).encode()
            sent: list[Message] = []
            messages = iter([{"type": "http.request", "body": body, "more_body": False}])

            async def receive() -> Message:
                message = next(messages, None)
                if message is not None:
                    return message
                await asyncio.sleep(0.1)  # queued behind the busy decode, then the client is gone
                return {"type": "http.disconnect"}

            async def send(message: Message) -> None:
                sent.append(message)

            scope = {
                "type": "http",
                "http_version": "1.1",
                "method": "POST",
                "path": "/recommend",
                "raw_path": b"/recommend",
                "query_string": b"",
                "root_path": "",
                "scheme": "http",
                "server": ("testserver", 80),
                "client": ("testclient", 50000),
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                "app": app,
            }
            await app(scope, receive, send)
            return sent

        assert client.portal is not None
        sent = client.portal.call(hang_up)
        busy.join()
        time.sleep(0.8)  # any decode of the abandoned request would have started by now
        metrics = client.get("/metrics").text
    abandoned = tuple(policy.catalog.sid_of(i) for i in (2, 4))
    assert abandoned not in decoded, "the model decoded a request whose client had hung up"
    assert len(decoded) == 1
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499  # the access log's status
    assert 'vstar_recommend_requests_total{mode="beam",outcome="cancelled"} 1.0' in metrics
    assert 'vstar_recommend_requests_total{mode="beam",outcome="ok"} 1.0' in metrics


def test_a_store_call_of_a_request_whose_client_hung_up_is_kept_to_its_end(
    make_settings: Callable[..., Settings],
) -> None:
    """A VED request's store read runs shielded; when the client hangs up (the request is cancelled) the read runs
    on all the same, so it is kept, as one given up at the cap is: its failure is counted when it ends, and the
    shutdown cancels it instead of leaving it pending."""
    app = create_app(make_settings())
    with TestClient(app) as client:
        recommender = app.state.recommender

        async def scenario() -> int:
            reading = asyncio.Event()

            async def stalled_read() -> list[str]:
                reading.set()
                await asyncio.sleep(30)
                return []

            request = asyncio.ensure_future(
                recommender.store_calls.within("read_history", stalled_read(), time.perf_counter() + 30)
            )
            await reading.wait()
            request.cancel()  # the client hung up
            await asyncio.gather(request, return_exceptions=True)
            return len(recommender.store_calls.given_up)

        assert client.portal.call(scenario) == 1
        kept = set(recommender.store_calls.given_up)
    assert all(task.cancelled() for task in kept) and not recommender.store_calls.given_up


def test_a_hang_up_in_the_turn_a_bounded_store_read_ends_still_cancels_the_request() -> None:
    """A VED request's store read is bounded by its cap; its client hangs up in the loop turn the read ends. The
    request is cancelled, not handed the read's answer to decode on (asyncio.wait_for swallowed such a cancel on
    Python 3.11, so the handler waited for a whole decode nobody would read)."""

    async def scenario() -> bool:
        calls = StoreCalls(ServiceMetrics())
        answer = asyncio.get_running_loop().create_future()

        async def read() -> list[str]:
            return await answer

        request = asyncio.ensure_future(calls.within("read_history", read(), time.perf_counter() + 30))
        for _ in range(3):  # the request waits on the read
            await asyncio.sleep(0)
        answer.set_result(["5"])
        await asyncio.sleep(0)  # the read ends: its task's result is set in this turn
        request.cancel()
        try:
            await request
        except asyncio.CancelledError:
            return True
        return False

    assert asyncio.run(scenario())
