"""Wire schemas: what clients send and receive. Decoders never see these.

Requests are strict (a string is not an int, ``true`` is not 1) and closed
(unknown fields are rejected), so a client's typo is a 422 naming the field
instead of a silently ignored option.

The limits a client can hit are ``Field`` bounds taken from ``Settings``:
``request_models(settings)`` derives the bounded request classes once per app,
so the OpenAPI schema always states the limits the server enforces. A request
converts itself into the decoder's config with ``to_decode_config()``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    create_model,
    field_validator,
)

from models.beam_search import BeamSearchConfig
from models.ved_config import VEDConfig
from service.settings import Settings


def _decimal_digits(value: object) -> object:
    """A path segment must be written as the integer itself: pydantic's lax int would also take
    " 5", "+5", "5_0" (50) and "\\x855" (a Unicode space before 5)."""
    if isinstance(value, str) and not re.fullmatch(r"-?[0-9]+", value):
        raise ValueError("must be a decimal integer (ASCII digits, an optional leading '-', nothing else)")
    return value


PathInt = Annotated[int, BeforeValidator(_decimal_digits)]  # an integer path parameter, strict about its text
Mode = Literal["beam", "ved"]


class ExternalItemRef(BaseModel):
    """An item named by its external id: an object, so that no string changes meaning (a string of digits is an
    item id, any other string a SID, whatever the catalog's own ids look like)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    external_id: str = Field(
        min_length=1,
        description="The item's own id in your catalog (item_map.json of the data the checkpoint was trained on, "
        "as vstar import writes it); a checkpoint without external ids takes none.",
    )


def _entry_form(value: object) -> str | None:
    """Which form a history entry takes, told by its JSON type alone (None: no form, one error that names them
    all, rather than one per form that it failed)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return "int"
    if isinstance(value, str):
        return "str"
    return "ExternalItemRef" if isinstance(value, dict | ExternalItemRef) else None


# an item id (an int, or a string of decimal digits as stored histories hold them), a SID string such as
# "<a_1><b_2><c_3>", or {"external_id": ...}
HistoryEntry = Annotated[
    Annotated[int, Tag("int")] | Annotated[str, Tag("str")] | Annotated[ExternalItemRef, Tag("ExternalItemRef")],
    Discriminator(
        _entry_form,
        custom_error_type="history_entry",
        custom_error_message='expected an item id, a SID string or an {"external_id": ...} object',
    ),
]
HISTORY_HELP = 'Item ids, SID strings or {"external_id": ...} objects, oldest first.'
EXCLUDE_HELP = (
    "Items never to recommend (out of stock, blocked, bought elsewhere): item ids, SID strings (every item of the "
    'SID) or {"external_id": ...} objects; ones the catalog does not know are passed over. Applies whatever '
    "exclude_history says."
)
EVENTS_HELP = 'Interactions to append, oldest first: item ids, SID strings or {"external_id": ...} objects.'


class RecommendRequest(BaseModel):
    """Unbounded base; the app serves the subclass made by ``request_models``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: str | None = Field(None, description="Use this user's stored history (plus `history`, if given).")
    history: list[HistoryEntry] | None = Field(None, description=HISTORY_HELP)
    k: int = Field(10, description="How many recommendations.")
    mode: Mode = Field(
        "beam",
        description="beam: constrained beam search of width k (plus the SIDs exclusion may drop), so a larger k "
        "can rank SIDs a smaller one missed; ved: value-guided search under a token budget and a latency cap.",
    )
    budget: int | None = Field(None, description="VED: token budget (default: the search's own).")
    latency_ms: int | None = Field(None, description="VED: latency cap in ms (default from settings).")
    exclude_history: bool | None = Field(None, description="Drop items already in the history (default from settings).")
    exclude_items: list[HistoryEntry] | None = Field(None, description=EXCLUDE_HELP)

    @field_validator("budget", "latency_ms")
    @classmethod
    def _ved_fields_need_ved(cls, value: int | None, info: ValidationInfo) -> int | None:
        """A beam request has no budget and no cap: one given would be silently ignored. A field validator (``mode``
        comes before both) so that the error is located at the field, as every other one: ``body.budget: ...``."""
        if value is not None and info.data.get("mode") == "beam":
            raise ValueError("applies to mode 'ved' only; beam search has no token budget or latency cap")
        return value

    def to_decode_config(self, extra: int, ved: VEDConfig) -> BeamSearchConfig | VEDConfig:
        """The decoder's config: ``k`` plus ``extra`` results (those exclusion may remove).

        VED searches with ``ved``'s settings (the checkpoint's) and this request's budget
        (None: VED's own for its k). Its deadline is left unset: the recommender sets it at
        decode time to the earliest deadline of the requests sharing the search.
        """
        if self.mode == "beam":
            return BeamSearchConfig(num_beams=self.k + extra)
        return replace(ved, num_candidates=self.k + extra, budget=self.budget)

    def cap_ms(self, settings: Settings) -> int:
        return self.latency_ms if self.latency_ms is not None else settings.ved_default_latency_ms

    def excludes_history(self, settings: Settings) -> bool:
        return settings.exclude_history_default if self.exclude_history is None else self.exclude_history


class EventsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    items: list[HistoryEntry] = Field(description=EVENTS_HELP)


class RecommendedItem(BaseModel):
    sid: str
    item_ids: list[int] = Field(description="Every catalog item with this SID (a SID may name several).")
    titles: list[str]
    external_ids: list[str] | None = Field(
        description="The items' own ids in your catalog, in item_ids' order; null when the checkpoint has none "
        "(trained on data without item_map.json)."
    )
    score: float = Field(
        description="beam: summed log-probability of the SID; ved: the search's score (summed log-probability plus "
        "its value term); either plus the shallow fusion's bonus, w x log(1 + transition score), when the checkpoint "
        "has a fusion weight."
    )


class SearchStats(BaseModel):
    tokens_spent: int
    nodes: int
    max_depth: int
    iterations: int
    fallback: Literal["initial_beam", "popular"] | None = Field(
        None,
        description="initial_beam: too little time was left for VED's initial tree, so a constrained beam "
        "search of width max(k plus the SIDs exclusion may remove, init_beams) answered (scores are summed "
        "log-probabilities, plus the fusion bonus as beam's); popular: not even that could finish within the cap, "
        "so the most frequent training targets answered (scores are their smoothed log-frequencies); null: VED ran.",
    )


class RecommendResponse(BaseModel):
    items: list[RecommendedItem]
    mode: Mode
    cap_hit: bool = Field(description="VED stopped at the latency cap (always false for beam).")
    search: SearchStats | None = Field(None, description="VED search statistics; null for beam.")
    model_version: str
    server_time_ms: float
    history_length: int = Field(description="History entries used (stored + given).")
    history_truncated: bool = Field(description="The history was cut to the model's maximum prompt length.")
    stored_history: Literal["used", "none", "unavailable"] = Field(
        description="used: the user's stored history was read; none: no user_id or nothing stored; "
        "unavailable: Redis is down, so only the request's history was used."
    )
    cached: bool = Field(description="Served from the response cache.")


class HistoryItem(BaseModel):
    item_id: int | None = Field(description="null when the event was given as a SID")
    sid: str
    title: str | None
    external_id: str | None = Field(
        description="The item's own id in your catalog; null when the event was given as a SID, or when the "
        "checkpoint has no external ids."
    )


class HistoryDeleted(BaseModel):
    user_id: str
    deleted: int = Field(
        description="Entries the stored history held; 0 when none was stored (a delete is safe to repeat)."
    )


class HistoryResponse(BaseModel):
    user_id: str
    history: list[HistoryItem]


class EventsResponse(BaseModel):
    user_id: str
    appended: int
    history_length: int


class ItemResponse(BaseModel):
    item_id: int
    sid: str
    title: str
    external_id: str | None = Field(description="The item's own id in your catalog; null when the checkpoint has none.")


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "degraded", "not_ready"]
    model: Literal["loaded", "not_loaded"]
    model_version: str | None
    redis: Literal["ok", "unreachable", "not_configured"]


@dataclass(frozen=True)
class RequestModels:
    recommend: type[RecommendRequest]
    events: type[EventsRequest]
    user_id_pattern: str
    max_user_id_length: int


USER_ID_PATTERN = r"^[A-Za-z0-9_.@:-]+$"


def request_models(settings: Settings) -> RequestModels:
    """Request classes whose bounds are this deployment's settings."""
    entry_list = list[HistoryEntry]
    recommend = create_model(
        "RecommendRequest",
        __base__=RecommendRequest,
        user_id=(
            str | None,
            Field(
                None,
                min_length=1,
                max_length=settings.max_user_id_length,
                pattern=USER_ID_PATTERN,
                description="Use this user's stored history (plus `history`, if given).",
            ),
        ),
        history=(
            entry_list | None,
            Field(
                None,
                max_length=settings.max_request_history,
                # empty is fine beside a user_id (a client with no events of its own); alone, it is refused by
                # name (the recommender: "give a non-empty history, or a user_id with a stored history")
                description=HISTORY_HELP,
            ),
        ),
        exclude_items=(
            entry_list | None,
            Field(None, max_length=settings.max_request_exclude, description=EXCLUDE_HELP),
        ),
        k=(int, Field(settings.default_k, ge=1, le=settings.max_k, description="How many recommendations.")),
        budget=(int | None, Field(None, ge=1, le=settings.ved_max_budget, description="VED: token budget.")),
        latency_ms=(
            int | None,
            Field(
                None,
                ge=1,
                le=settings.ved_max_latency_ms,
                description=f"VED: cap in ms (default {settings.ved_default_latency_ms}).",
            ),
        ),
    )
    events = create_model(
        "EventsRequest",
        __base__=EventsRequest,
        items=(
            entry_list,
            Field(
                min_length=1,
                max_length=settings.max_events,
                description=EVENTS_HELP,
            ),
        ),
    )
    return RequestModels(recommend, events, USER_ID_PATTERN, settings.max_user_id_length)


class ErrorDetail(BaseModel):
    type: str = Field(description="invalid_request, unauthorized, not_found, payload_too_large, store_unavailable, ...")
    message: str = Field(description="Names the offending field first: `history: unknown item ids [...]`.")


class ErrorResponse(BaseModel):
    error: ErrorDetail
