"""The users' stored histories over HTTP: event writes, reads and deletes (``/users/{user_id}/...``).

The recommender reads a named user's history on its own path (``Recommender._history_for``, bounded by a VED
request's cap); this is the rest of what the service does with the store's histories, no call bounded (these
requests have no cap): reads and deletes through ``StoreCalls.within(..., None)``, which counts their failures,
event writes through the store itself, their three ways of failing counted here. Each failure is a 503 that
says what became of the write.
"""

from __future__ import annotations

from collections.abc import Sequence

from models.sid_catalog import SidCatalog, sid_to_str
from service.errors import NotFound, StoreUnavailable
from service.history import resolve_entries, resolve_stored
from service.metrics import ServiceMetrics
from service.schemas import EventsResponse, ExternalItemRef, HistoryDeleted, HistoryItem, HistoryResponse
from service.store_calls import StoreCalls
from service.stores import Store, StoreRefused, WriteOutcomeUnknown


class UserHistories:
    """``POST /users/{user_id}/events``, ``GET`` and ``DELETE /users/{user_id}/history``."""

    def __init__(self, catalog: SidCatalog, store: Store, store_calls: StoreCalls, metrics: ServiceMetrics) -> None:
        self.catalog = catalog
        self.store = store
        self.store_calls = store_calls
        self.metrics = metrics

    async def append_events(
        self, user_id: str, entries: Sequence[int | str | ExternalItemRef], idempotency_key: str | None = None
    ) -> tuple[EventsResponse, bool]:
        """The response, and whether it replays an earlier write under the same ``idempotency_key``."""
        events = resolve_entries(self.catalog, entries, "items")
        try:
            done = await self.store.append(user_id, [e.stored() for e in events], idempotency_key)
        except WriteOutcomeUnknown:
            self.metrics.store_errors.labels("append_history").inc()
            retry = (
                "retry with the same Idempotency-Key" if idempotency_key else "send an Idempotency-Key to retry safely"
            )
            raise StoreUnavailable(
                f"the history store did not confirm the write; the events may have been stored: {retry}"
            ) from None
        except StoreRefused as e:
            self.metrics.store_errors.labels("append_history").inc()
            raise StoreUnavailable(
                f"the history store refused the write ({e.reason}); the events were not stored"
            ) from None
        except StoreUnavailable:
            self.metrics.store_errors.labels("append_history").inc()
            raise StoreUnavailable("the history store is unavailable; the events were not stored, retry") from None
        return EventsResponse(
            user_id=user_id, appended=done.appended, history_length=done.history_length
        ), done.replayed

    async def delete_history(self, user_id: str) -> HistoryDeleted:
        """Delete the user's stored history (``Store.delete_history``); 503 when the store fails, which says
        whether it may have gone: a delete is safe to repeat."""
        try:
            deleted = await self.store_calls.within("delete_history", self.store.delete_history(user_id), None)
        except StoreRefused as e:
            raise StoreUnavailable(
                f"the history store refused the delete ({e.reason}); the history was not deleted"
            ) from None
        except StoreUnavailable:
            raise StoreUnavailable(
                "the history store is unavailable or did not answer; the history may not be deleted: retry (a "
                "delete is safe to repeat)"
            ) from None
        return HistoryDeleted(user_id=user_id, deleted=deleted)

    async def history(self, user_id: str) -> HistoryResponse:
        stored, _ = resolve_stored(
            self.catalog, await self.store_calls.within("read_history", self.store.history(user_id), None)
        )
        if not stored:
            raise NotFound(f"user_id: no stored history for user {user_id!r}")
        items = [
            HistoryItem(
                item_id=e.item_id,
                sid=sid_to_str(e.sid),
                title=self.catalog.items[e.item_id].title if e.item_id is not None else None,
                external_id=self.catalog.external_id_of(e.item_id) if e.item_id is not None else None,
            )
            for e in stored
        ]
        return HistoryResponse(user_id=user_id, history=items)
