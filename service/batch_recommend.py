"""``vstar recommend``: offline batch recommendations, the answers ``POST /recommend`` gives, for a file of users.

Each line of the input is one user, ``{"user_id": ..., "history": [...]}``, with an optional ``"exclude_items":
[...]`` of items never to recommend to that user (the request's field); the output has a line for each,
in the same order, ``{"user_id": ..., "items": [...]}``, with the items ``POST /recommend`` answers for that
history and the command's options (the request's ``k``, ``mode``, ``budget`` and ``exclude_history``, the
same for every line). With ``--stored-history`` a line's ``user_id`` is looked up as ``POST /recommend`` looks
it up: the user's stored history comes before the line's own, which may then be left out.

Design decisions:

* The service's code, not a copy of it: the ``Recommender`` the app loads (``service.app.load_recommender``)
  resolves each history (``service.history``: item ids, SID strings, ``{"external_id": ...}``), plans its
  decode (``Recommender.plan``: the prompt window, exclusion, the fusion's items, the decode config with
  VED's budget resolved), decodes a group of plans of one config (``DecodeScheduler.decode``), and ranks and
  builds the items (``Recommender.rank``, ``wire_items``). Left out is what needs a server: the response
  cache and VED's latency cap: every search runs to its budget, as a request answered before its cap does
  (``cap_hit`` false); and, unless asked for, the stored history (a line's ``user_id`` is then only a label,
  echoed back).
* ``--stored-history`` (nightly precompute over the users the service stores events for): the store is the
  one ``vstar serve`` uses in the same environment (``service.app.build_store``: Redis at ``REDIS_URL``;
  without one the service keeps each process's histories in its own memory, which no other process can read,
  so the option is refused), read through the service's ``Store``. A line's stored entries are resolved by
  ``resolve_stored`` (those the catalog no longer knows skipped, and counted in the report) and put before its
  own by ``Recommender.stored_then_given``, as a request is answered: a user with neither is the request's
  404, a line error. Every named user's stored history is read once, up front, before the model loads
  (``service.stores.read_histories``: the last ``VSTAR_STORED_HISTORY_MAX`` entries, as a request reads
  them; a Redis pipeline per ``HISTORIES_CHUNK`` users, behind a progress bar). A store that fails (down, or
  refusing the read) stops the command with one error naming the store (and ``unreachable_hint``'s setting), and nothing
  is written: the service answers a request that carries a history from that history alone while
  Redis is down, but an offline job that quietly did so would write other answers than the ones asked for.
  The ``user_id`` must then be one the service stores events under (``USER_ID_PATTERN``,
  ``VSTAR_MAX_USER_ID_LENGTH``), as ``POST /recommend`` refuses any other: none could have a stored history.
* The settings are the service's (``Settings``, ``VSTAR_*`` from the environment): a line is answered as a
  service started in the same environment answers it (``VSTAR_DEFAULT_K``, ``VSTAR_EXCLUDE_HISTORY_DEFAULT``,
  ``VSTAR_FUSION_WEIGHT``, ``VSTAR_DEVICE``, ``VSTAR_TORCH_THREADS``), the command's options taking their
  place when given. The request limits (``VSTAR_MAX_K``, ``VSTAR_MAX_REQUEST_HISTORY``,
  ``VSTAR_VED_MAX_BUDGET``) guard a shared server, not this process, and do not apply.
* Batches as the micro-batcher forms them: ``batch_size`` consecutive users, split into groups of one decode
  config (without exclusion all the users share one), each group decoded at once. A user's answer does not
  depend on its batch: beam search scores each prompt alone (rows only share padded matmuls, so scores agree
  to float rounding), and VED's draws are keyed by the prompt (``models.search_noise``).
* Every line is checked before any decode: its JSON and shape first (then, with ``--stored-history``, the
  stored histories are read), its items and stored history against the catalog once the model has loaded.
  The first bad line stops the command with one error naming the file and the line (and how many lines are
  bad), and nothing is written. The answers are written batch by batch under a temporary name beside ``out``
  and renamed onto it at the end (``models.atomic_folder.replacing_file``): a failure or a kill leaves
  ``out`` as it was.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from tqdm import tqdm

from models.atomic_folder import replacing_file
from service.app import load_recommender
from service.decode_scheduler import DecodePlan, DecodeRow
from service.errors import InvalidInput, NotFound, StoreUnavailable, shorten, unreadable_body, validation_message
from service.history import resolve_entries, resolve_stored
from service.metrics import ServiceMetrics
from service.recommender import Recommender
from service.schemas import USER_ID_PATTERN, RecommendedItem, RecommendRequest
from service.settings import Settings
from service.stores import Store, read_histories, store_failure

LINE_FIELDS = ("user_id", "history", "exclude_items")
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class UserLine:
    """One line of the input, read: its number, the user's label and the request it makes."""

    number: int
    user_id: str | None
    request: RecommendRequest


@dataclass(frozen=True)
class UserPlan:
    line: UserLine
    plan: DecodePlan
    stored: int = 0  # events of the user's stored history in the plan's history (--stored-history)
    skipped: int = 0  # stored entries the catalog no longer knows, left out as the service leaves them


@dataclass(frozen=True)
class BatchReport:
    users: int
    seconds: float  # decoding and writing, after the model loaded and every line was checked
    stored_users: int | None = None  # users answered with a stored history (None: none was read)
    skipped: int = 0  # stored entries the catalog no longer knows, over all the lines


class InputError(ValueError):
    """A line of the input that no answer can be made for; the message names the file and the line."""


class StoreError(ValueError):
    """The history store failed while ``--stored-history`` read it: the command stops, nothing written."""


def every_line(path: Path, numbered: Iterable[tuple[int, T]], each: Callable[[int, T], R]) -> list[R]:
    """``each(number, line)`` of every numbered line of ``path``: all of them, or an ``InputError``, the first
    line's error (a ``ValueError``, or the API's ``InvalidInput`` or ``NotFound``) with how many lines have one."""
    out, errors = [], []
    for number, line in numbered:
        try:
            out.append(each(number, line))
        except (ValueError, InvalidInput, NotFound) as e:
            errors.append(f"{path}:{number}: {e}")
    if errors:
        more = f" ({len(errors)} lines have errors; the first is shown)" if len(errors) > 1 else ""
        raise InputError(errors[0] + more)
    return out


def read_users(path: Path, fields: dict[str, Any], stored_id_length: int | None = None) -> list[UserLine]:
    """Every line of ``path`` read and checked (JSON, shape, the history entries' types), blank lines skipped;
    ``fields``: the request's options, for every line; ``stored_id_length``: with ``--stored-history``, the
    longest user id the service takes (``VSTAR_MAX_USER_ID_LENGTH``, ``read_line``). No catalog needed yet."""
    with path.open("rb") as f:
        numbered = [(number, raw) for number, raw in enumerate(f, 1) if raw.strip()]
    if not numbered:
        raise InputError(f"{path}: no users (no line that is not blank)")
    return every_line(path, numbered, lambda number, raw: read_line(number, raw, fields, stored_id_length))


def read_line(number: int, raw: bytes, fields: dict[str, Any], stored_id_length: int | None = None) -> UserLine:
    """A line as a user and the ``POST /recommend`` request its history makes with ``fields``: ``ValueError`` for
    a line that is not an object of an optional ``user_id`` (a string UTF-8 can hold) and a non-empty ``history``
    of the entries the request takes, in the API's words for them. With ``stored_id_length``
    (``--stored-history``) a line with a ``user_id`` may leave its history out or empty, and the id must be one
    ``POST /recommend`` takes: 1 to ``stored_id_length`` of ``USER_ID_PATTERN``'s characters."""
    try:
        body = json.loads(raw.decode("utf-8").rstrip("\r\n"))
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON at column {e.colno}: {e.msg}") from None
    except (ValueError, RecursionError) as e:  # not UTF-8, an integer too long to read, nesting too deep
        raise ValueError(f"cannot be read as JSON: {unreadable_body(e)}") from None
    if not isinstance(body, dict):
        raise ValueError(f'expected an object {{"user_id": ..., "history": [...]}}, got {shorten(json.dumps(body))}')
    unknown = [shorten(key) for key in body if key not in LINE_FIELDS]
    if unknown:
        raise ValueError(
            f"unknown fields {unknown}: a line holds user_id, history and exclude_items (the options give every "
            "line's k, mode, budget and exclude_history)"
        )
    user_id = body.get("user_id")
    if user_id is not None and not isinstance(user_id, str):
        raise ValueError(f"user_id: expected a string, got {shorten(json.dumps(user_id))}")
    if user_id is not None and not user_id.isascii() and not encodable(user_id):
        # JSON's "\ud800" escape reads as a lone surrogate, which no UTF-8 answer line can echo back
        raise ValueError(f"user_id: {shorten(ascii(user_id))} is not valid Unicode (a lone surrogate)")
    if stored_id_length is not None and user_id is not None and not valid_user_id(user_id, stored_id_length):
        raise ValueError(
            f"user_id: {shorten(repr(user_id))} is no user id the service stores a history under (1 to "
            f"{stored_id_length} of A-Z a-z 0-9 _ . @ : -)"
        )
    history = body.get("history")
    if (history is None or history == []) and (stored_id_length is None or user_id is None):
        what = "empty" if history == [] else "missing"
        stored = "" if stored_id_length is None else ", or a user_id whose stored history --stored-history reads"
        raise ValueError(
            f"history: {what}: give the user's items, oldest first (item ids, SID strings or "
            f'{{"external_id": ...}} objects){stored}'
        )
    try:
        request = RecommendRequest.model_validate(
            fields | {"history": history, "exclude_items": body.get("exclude_items")}
        )
    except ValidationError as e:
        raise ValueError(validation_message(e.errors())) from None
    return UserLine(number, user_id, request)


def encodable(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8 (a lone surrogate cannot)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def valid_user_id(user_id: str, max_length: int) -> bool:
    return len(user_id) <= max_length and re.fullmatch(USER_ID_PATTERN, user_id) is not None


def read_stored(store: Store, user_ids: Sequence[str], progress: bool = True) -> dict[str, list[str]]:
    """Each user's stored entries, as the store holds them (not yet resolved; ``read_histories``); the store is
    closed after. A store that fails is one ``StoreError`` naming it."""

    async def read_all() -> dict[str, list[str]]:
        try:
            return await read_histories(store, user_ids, progress)
        finally:
            await store.close()

    try:
        return asyncio.run(read_all())
    except StoreUnavailable as e:
        raise StoreError(
            f"--stored-history: {store_failure(store, e, 'could not be read')}; nothing was written"
        ) from None


def plan_line(recommender: Recommender, line: UserLine, stored: Mapping[str, list[str]] | None = None) -> UserPlan:
    """The line's history resolved against the catalog and its decode planned (``InvalidInput`` as the API's).
    With ``stored`` (``--stored-history``: each user's stored entries) a named user's stored history comes first,
    as ``POST /recommend`` combines them (``NotFound`` as its 404 when neither has any)."""
    given = resolve_entries(recommender.catalog, line.request.history or [], "history")
    if stored is None or line.user_id is None:
        assert given  # read_line refuses a line with neither
        return UserPlan(line, recommender.plan(line.request, given))
    events, skipped = resolve_stored(recommender.catalog, stored[line.user_id])
    history = recommender.stored_then_given(line.user_id, events, given)
    return UserPlan(line, recommender.plan(line.request, history), len(events), skipped)


def answers(recommender: Recommender, users: Sequence[UserPlan], batch_size: int) -> Iterator[list[RecommendedItem]]:
    """Each user's items, in order: ``batch_size`` users at a time, a batch decoded in groups of one config."""
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        groups: dict[Hashable, list[int]] = {}
        for i, user in enumerate(batch):
            groups.setdefault(user.plan.config, []).append(i)
        rows: dict[int, DecodeRow] = {}
        for config, members in groups.items():
            decoded = recommender.decode(config, [batch[i].plan.job for i in members])
            rows.update(zip(members, decoded, strict=True))
        for i, user in enumerate(batch):
            row = rows[i]
            assert not row.shed and not row.fallback  # no deadline, no hard cap: every search runs to its budget
            yield recommender.wire_items(recommender.rank(row, user.plan.excluded, user.line.request.k))


def answer_line(user: UserPlan, items: list[RecommendedItem]) -> bytes:
    body = {"user_id": user.line.user_id, "items": [it.model_dump(mode="json") for it in items]}
    return json.dumps(body, ensure_ascii=False, allow_nan=False).encode() + b"\n"


def recommend_file(
    settings: Settings,
    source: Path,
    out: Path,
    fields: dict[str, Any],
    batch_size: int,
    progress: bool = True,
    store: Store | None = None,
) -> BatchReport:
    """Answer every user of ``source`` into ``out`` (see the module doc); ``fields``: the request's options,
    checked by the caller (``RecommendRequest`` takes them); ``store``: the history store each named user's
    stored history is read from, up front (``--stored-history``), and closed after; None: none is read."""
    lines = read_users(source, fields, settings.max_user_id_length if store is not None else None)
    stored = None
    if store is not None:
        named = dict.fromkeys(line.user_id for line in lines if line.user_id is not None)  # each user once
        stored = read_stored(store, list(named), progress)
    recommender = load_recommender(settings, ServiceMetrics(), ved=fields["mode"] == "ved")
    try:
        try:  # the options' own: a budget too small for k is no line's fault
            recommender.plan(RecommendRequest.model_validate(fields), [])
        except InvalidInput as e:
            raise ValueError(f"--{e}") from None
        numbered = [(line.number, line) for line in lines]
        users = every_line(source, numbered, lambda _, line: plan_line(recommender, line, stored))
        started = time.perf_counter()
        out.parent.mkdir(parents=True, exist_ok=True)
        with (
            replacing_file(out) as f,
            tqdm(total=len(users), desc="recommend", unit="user", disable=not progress) as bar,
        ):
            for user, items in zip(users, answers(recommender, users, batch_size), strict=True):
                f.write(answer_line(user, items))
                bar.update()
        seconds = time.perf_counter() - started
        if stored is None:
            return BatchReport(len(users), seconds)
        return BatchReport(len(users), seconds, sum(u.stored > 0 for u in users), sum(u.skipped for u in users))
    finally:
        recommender.executor.shutdown(wait=True)  # no thread was started: it decoded on this one
