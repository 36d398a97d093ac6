"""HTTP routes: glue between the wire schemas and the recommender, nothing else.

No ``from __future__ import annotations`` here: the request body classes are
built per app from the settings (``schemas.request_models``), so the handlers'
annotations must be evaluated where those classes are in scope.
"""

import asyncio
import contextlib
import secrets
from collections.abc import Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Request, Response, Security
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST

from service.errors import NotFound, NotReady, Unauthorized, UnsupportedMediaType, shorten
from service.middleware import ARRIVAL_KEY
from service.recommender import Recommender
from service.schemas import (
    ErrorResponse,
    EventsResponse,
    Health,
    HistoryDeleted,
    HistoryResponse,
    ItemResponse,
    PathInt,
    Readiness,
    RecommendResponse,
    RequestModels,
)


async def get_recommender(request: Request) -> Recommender:
    # async on purpose: FastAPI runs a plain ``def`` dependency in a worker thread, a thread hop and a GIL
    # hand-off per request that starved the event loop (and so VED's hard cap) under load
    recommender: Recommender | None = request.app.state.recommender
    if recommender is None:
        raise NotReady("the model is not loaded yet")
    return recommender


RecommenderDep = Annotated[Recommender, Depends(get_recommender)]
API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="One of VSTAR_API_KEYS, if any are set.")


async def require_api_key(request: Request, key: Annotated[str | None, Security(API_KEY_HEADER)]) -> None:
    """Writes (event posts, history deletes) need one of the configured keys (none configured: writes are
    open)."""
    allowed = request.app.state.settings.api_keys
    if not allowed:
        return
    if not key:
        raise Unauthorized("X-API-Key: missing; this server takes writes (events, deletes) only with an API key")
    # compare with every key, in constant time, so neither a match nor its position shows in the timing
    if not sum(secrets.compare_digest(key.encode(), k.get_secret_value().encode()) for k in allowed):
        raise Unauthorized("X-API-Key: not a valid key")


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=128,
        pattern=r"^[\x21-\x7e]+$",
        description="Any 1-128 visible ASCII characters, new for each write; a retry with it never stores twice.",
    ),
]


async def require_json(request: Request) -> None:
    """A POST body must be declared JSON: anything else is a 415 naming what was sent, not a 422 about a
    "dictionary" (FastAPI does not parse a body declared otherwise, or not declared at all)."""
    declared = request.headers.get("content-type")
    media = (declared or "").split(";")[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        sent = shorten(declared) if declared else "missing"
        raise UnsupportedMediaType(f"content-type: expected application/json, got {sent}")


CLIENT_GONE = 499  # nginx's "client closed request": logged, never read


async def _hung_up(request: Request) -> None:
    """Returns when the client disconnects (the body is read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_hung_up(request: Request, work: Coroutine[Any, Any, Any]) -> Any:
    """``work``'s result, or, when the client disconnects first, ``work`` cancelled (a queued decode is dropped,
    a running one's result discarded) and a 499 nobody reads. Neither Starlette nor uvicorn cancels a handler
    whose client went: the model would decode answers for clients that timed out, under load most of all."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_hung_up(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()  # the client went, or this handler was cancelled itself
    if not task.cancelled() and task.done():
        return task.result()
    with contextlib.suppress(asyncio.CancelledError):
        await task  # its own cleanup (a VED request's timer) runs before the handler ends
    return Response(status_code=CLIENT_GONE)


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in (400, 413, 422, *codes)}


def build_router(models: RequestModels, api_keys: bool) -> APIRouter:
    """``api_keys``: writes need one; only then does the schema declare the X-API-Key scheme."""
    router = APIRouter()
    RecommendBody = models.recommend  # noqa: N806 - a class, named like one
    EventsBody = models.events  # noqa: N806
    UserId = Annotated[  # noqa: N806
        str, Path(min_length=1, max_length=models.max_user_id_length, pattern=models.user_id_pattern)
    ]

    @router.post(
        "/recommend", responses=_errors(404, 415, 503), tags=["recommend"], dependencies=[Depends(require_json)]
    )
    async def recommend(body: RecommendBody, request: Request, recommender: RecommenderDep) -> RecommendResponse:  # type: ignore[valid-type]  # noqa: E501
        """Rank k items for a history (given, stored under `user_id`, or both: stored first)."""
        return await unless_hung_up(request, recommender.recommend(body, arrival=request.scope.get(ARRIVAL_KEY)))

    @router.post(
        "/users/{user_id}/events",
        responses=_errors(401, 415, 503),
        tags=["users"],
        dependencies=[Security(require_api_key), Depends(require_json)] if api_keys else [Depends(require_json)],
    )
    async def append_events(
        user_id: UserId,
        body: EventsBody,  # type: ignore[valid-type]  # built from the settings at startup
        recommender: RecommenderDep,
        response: Response,
        idempotency_key: IdempotencyKey = None,
    ) -> EventsResponse:
        """Append interactions to the user's stored history; 503 if they were not stored (or, said so, when that
        is unknown). With an `Idempotency-Key`, a retry never stores twice: it gets the first write's answer with
        `Idempotent-Replayed: true`."""
        answer, replayed = await recommender.users.append_events(user_id, body.items, idempotency_key)  # type: ignore[attr-defined]
        if replayed:
            response.headers["Idempotent-Replayed"] = "true"
        return answer

    @router.delete(
        "/users/{user_id}/history",
        responses=_errors(401, 503),
        tags=["users"],
        dependencies=[Security(require_api_key)] if api_keys else [],
    )
    async def delete_history(user_id: UserId, recommender: RecommenderDep) -> HistoryDeleted:
        """Delete the user's stored history (a user's request to be forgotten): 200 with the entries it held, 0
        when none was stored. Later recommendations for the user have no stored history (404 without one in the
        request); an event write retried with an `Idempotency-Key` it used before is answered as a replay, not
        stored again."""
        return await recommender.users.delete_history(user_id)

    @router.get("/users/{user_id}/history", responses=_errors(404, 503), tags=["users"])
    async def history(user_id: UserId, recommender: RecommenderDep) -> HistoryResponse:
        """The user's stored history, oldest first."""
        return await recommender.users.history(user_id)

    @router.get("/items/external", include_in_schema=False)
    async def item_by_no_external_id() -> None:
        """Before ``/items/{item_id}``, which would answer that "external" is not an item id."""
        raise NotFound("external_id: none given: GET /items/external/{external_id}")

    @router.get("/items/{item_id}", responses=_errors(404), tags=["items"])
    async def item(item_id: PathInt, recommender: RecommenderDep) -> ItemResponse:
        """One catalog item: its SID, title and external id."""
        return recommender.item(item_id)

    @router.get("/items/external/{external_id:path}", responses=_errors(404), tags=["items"])
    async def item_by_external_id(external_id: str, recommender: RecommenderDep) -> ItemResponse:
        """One catalog item by its own id in your catalog (which may hold `/`); 404 when no item has it (as
        when the checkpoint has no external ids)."""
        return recommender.item_by_external_id(external_id)

    @router.get("/healthz", tags=["ops"])
    async def healthz() -> Health:
        """Liveness: the process answers."""
        return Health(status="ok")

    @router.get("/readyz", responses={503: {"model": Readiness}}, tags=["ops"])
    async def readyz(request: Request, response: Response) -> Readiness:
        """Readiness: model loaded; Redis reachable (degraded, still 200, when it is not) or not configured."""
        recommender: Recommender | None = request.app.state.recommender
        if recommender is None:
            response.status_code = 503
            return Readiness(status="not_ready", model="not_loaded", model_version=None, redis="not_configured")
        return await recommender.readiness()

    @router.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return router
