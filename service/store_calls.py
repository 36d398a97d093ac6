"""Store calls bounded by a request's time: a VED request stops waiting for Redis at its own bound, while the
call runs on to the store's own timeout, which judges the store.

Design decisions:

* A call given up on is treated as a store that did not answer (``OutOfTime``, a ``StoreUnavailable``), so the
  request goes on without it; it is counted as a store error only if the call itself fails later: the store may
  be healthy and the request's cap short.
* The call itself is shielded, not cancelled: a stalled Redis then reaches the store's own timeout, which opens
  the store's circuit breaker, so the next requests skip it at once instead of each waiting out its own bound.
* The event loop holds tasks weakly: the calls given up on are kept here until they end, and ``close``
  (shutdown) cancels those still running rather than leave them pending past the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from service.errors import StoreUnavailable
from service.metrics import ServiceMetrics

T = TypeVar("T")
log = logging.getLogger("service.recommender")


class OutOfTime(StoreUnavailable):
    """A store call a VED request gave up on (its cap): handled as the store being unavailable, but counted as a
    store error only if the call itself fails later (the store may be healthy, the cap short)."""


class StoreCalls:
    """Runs store calls for requests, each bounded or not, and counts their failures per operation."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics
        self.given_up: set[asyncio.Future[Any]] = set()  # calls running on after their request left them

    async def within(self, op: str, call: Awaitable[T], by: float | None) -> T:
        """The store call ``call``; a failure is counted as ``op``'s and raised (``StoreUnavailable``). With
        ``by`` (``time.perf_counter()``, from a VED request's cap; None: no bound) it is given up at ``by`` as a
        store that did not answer (``OutOfTime``), and the call itself runs on to the store's own timeout, its
        failure counted when it ends."""
        try:
            if by is None:
                return await call
            task = asyncio.ensure_future(call)
            try:
                # asyncio.wait, not wait_for(shield(...)): on Python 3.11 wait_for swallows a cancel that arrives
                # in the loop turn the call ends, so a request whose client hung up went on to decode
                done, _ = await asyncio.wait({task}, timeout=max(by - time.perf_counter(), 0.0))
            except asyncio.CancelledError:  # the client hung up: the call runs on all the same
                self._give_up(op, task)
                raise
            if not done:
                self._give_up(op, task)
                raise OutOfTime("the store did not answer within the request's latency cap")
            return task.result()
        except StoreUnavailable as e:
            if not isinstance(e, OutOfTime):  # a call given up on is counted when it ends (_settled_late)
                self.metrics.store_errors.labels(op).inc()
            raise

    async def close(self) -> None:
        """Cancel the calls given up on that still run: nobody waits for them any more."""
        for task in list(self.given_up):
            task.cancel()
        await asyncio.gather(*self.given_up, return_exceptions=True)

    def _give_up(self, op: str, task: asyncio.Future[Any]) -> None:
        """Leave a store call running to its own end, which counts its failure (``_settled_late``)."""
        if task.done():
            self._settled_late(op, task)
            return
        self.given_up.add(task)
        task.add_done_callback(lambda done: self._settled_late(op, done))

    def _settled_late(self, op: str, task: asyncio.Future[Any]) -> None:
        """A store call its request gave up on has ended: a failure counts as the store's."""
        self.given_up.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, StoreUnavailable):
            self.metrics.store_errors.labels(op).inc()
        elif error is not None:
            log.error("store call failed after its request gave up on it", exc_info=error, extra={"op": op})
