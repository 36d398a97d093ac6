"""``vstar recommend``: offline batch recommendations, the answers ``POST /recommend`` gives, for a file of users.

Each line of the input is one user, ``{"user_id": ..., "history": [...]}``; the output has a line for each,
in the same order, ``{"user_id": ..., "items": [...]}``, with the items ``POST /recommend`` answers for that
history and the command's options (the request's ``k``, ``mode``, ``budget`` and ``exclude_history``, the
same for every line).

Design decisions:

* The service's code, not a copy of it: the ``Recommender`` the app loads (``service.app.load_recommender``)
  resolves each history (``service.history``: item ids, SID strings, ``{"external_id": ...}``), plans its
  decode (``Recommender.plan``: the prompt window, exclusion, the fusion's items, the decode config with
  VED's budget resolved), decodes a group of plans of one config (``DecodeScheduler.decode``), and ranks and
  builds the items (``Recommender.rank``, ``wire_items``). Left out is what needs a server: the stored
  history (a line's ``user_id`` is only a label, echoed back), the response cache, and VED's latency cap:
  every search runs to its budget, as a request answered before its cap does (``cap_hit`` false).
* The settings are the service's (``Settings``, ``VSTAR_*`` from the environment): a line is answered as a
  service started in the same environment answers it (``VSTAR_DEFAULT_K``, ``VSTAR_EXCLUDE_HISTORY_DEFAULT``,
  ``VSTAR_FUSION_WEIGHT``, ``VSTAR_DEVICE``, ``VSTAR_TORCH_THREADS``), the command's options taking their
  place when given. The request limits (``VSTAR_MAX_K``, ``VSTAR_MAX_REQUEST_HISTORY``,
  ``VSTAR_VED_MAX_BUDGET``) guard a shared server, not this process, and do not apply.
* Batches as the micro-batcher forms them: ``batch_size`` consecutive users, split into groups of one decode
  config (without exclusion all the users share one), each group decoded at once. A user's answer does not
  depend on its batch: beam search scores each prompt alone (rows only share padded matmuls, so scores agree
  to float rounding), and VED's draws are keyed by the prompt (``models.search_noise``).
* Every line is checked before any decode: its JSON and shape before the model loads, its items against the
  catalog after. The first bad line stops the command with one error naming the file and the line (and how
  many lines are bad), and nothing is written. The answers are written batch by batch under a temporary name
  beside ``out`` and renamed onto it at the end (``models.atomic_folder.replacing_file``): a failure or a
  kill leaves ``out`` as it was.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from tqdm import tqdm

from models.atomic_folder import replacing_file
from service.app import load_recommender
from service.decode_scheduler import DecodePlan, DecodeRow
from service.errors import InvalidInput, shorten, unreadable_body, validation_message
from service.history import resolve_entries
from service.metrics import ServiceMetrics
from service.recommender import Recommender
from service.schemas import RecommendedItem, RecommendRequest
from service.settings import Settings

LINE_FIELDS = ("user_id", "history")
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


@dataclass(frozen=True)
class BatchReport:
    users: int
    seconds: float  # decoding and writing, after the model loaded and every line was checked


class InputError(ValueError):
    """A line of the input that no answer can be made for; the message names the file and the line."""


def every_line(path: Path, numbered: Iterable[tuple[int, T]], each: Callable[[int, T], R]) -> list[R]:
    """``each(number, line)`` of every numbered line of ``path``: all of them, or an ``InputError``, the first
    line's error (a ``ValueError``, or the API's ``InvalidInput``) with how many lines have one."""
    out, errors = [], []
    for number, line in numbered:
        try:
            out.append(each(number, line))
        except (ValueError, InvalidInput) as e:
            errors.append(f"{path}:{number}: {e}")
    if errors:
        more = f" ({len(errors)} lines have errors; the first is shown)" if len(errors) > 1 else ""
        raise InputError(errors[0] + more)
    return out


def read_users(path: Path, fields: dict[str, Any]) -> list[UserLine]:
    """Every line of ``path`` read and checked (JSON, shape, the history entries' types), blank lines skipped;
    ``fields``: the request's options, for every line. The catalog is not needed yet."""
    with path.open("rb") as f:
        numbered = [(number, raw) for number, raw in enumerate(f, 1) if raw.strip()]
    if not numbered:
        raise InputError(f"{path}: no users (no line that is not blank)")
    return every_line(path, numbered, lambda number, raw: read_line(number, raw, fields))


def read_line(number: int, raw: bytes, fields: dict[str, Any]) -> UserLine:
    """A line as a user and the ``POST /recommend`` request its history makes with ``fields``: ``ValueError`` for
    a line that is not an object of an optional ``user_id`` (a string) and a non-empty ``history`` of the entries
    the request takes, in the API's words for them."""
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
            f"unknown fields {unknown}: a line holds user_id and history (the options give every line's k, mode, "
            "budget and exclude_history)"
        )
    user_id = body.get("user_id")
    if user_id is not None and not isinstance(user_id, str):
        raise ValueError(f"user_id: expected a string, got {shorten(json.dumps(user_id))}")
    history = body.get("history")
    if history is None or history == []:
        what = "empty" if history == [] else "missing"
        raise ValueError(
            f"history: {what}: give the user's items, oldest first (item ids, SID strings or "
            '{"external_id": ...} objects)'
        )
    try:
        request = RecommendRequest.model_validate(fields | {"history": history})
    except ValidationError as e:
        raise ValueError(validation_message(e.errors())) from None
    return UserLine(number, user_id, request)


def plan_line(recommender: Recommender, line: UserLine) -> UserPlan:
    """The line's history resolved against the catalog and its decode planned (``InvalidInput`` as the API's)."""
    assert line.request.history
    events = resolve_entries(recommender.catalog, line.request.history, "history")
    return UserPlan(line, recommender.plan(line.request, events))


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
    settings: Settings, source: Path, out: Path, fields: dict[str, Any], batch_size: int, progress: bool = True
) -> BatchReport:
    """Answer every user of ``source`` into ``out`` (see the module doc); ``fields``: the request's options,
    checked by the caller (``RecommendRequest`` takes them)."""
    lines = read_users(source, fields)
    recommender = load_recommender(settings, ServiceMetrics())
    try:
        try:  # the options' own: a budget too small for k is no line's fault
            recommender.plan(RecommendRequest.model_validate(fields), [])
        except InvalidInput as e:
            raise ValueError(f"--{e}") from None
        numbered = [(line.number, line) for line in lines]
        users = every_line(source, numbered, lambda _, line: plan_line(recommender, line))
        started = time.perf_counter()
        out.parent.mkdir(parents=True, exist_ok=True)
        with (
            replacing_file(out) as f,
            tqdm(total=len(users), desc="recommend", unit="user", disable=not progress) as bar,
        ):
            for user, items in zip(users, answers(recommender, users, batch_size), strict=True):
                f.write(answer_line(user, items))
                bar.update()
        return BatchReport(len(users), time.perf_counter() - started)
    finally:
        recommender.executor.shutdown(wait=True)  # no thread was started: it decoded on this one
