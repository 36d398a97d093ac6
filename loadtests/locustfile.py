"""Locust users for the recommendation service: beam and VED side by side.

``BeamUser`` and ``VedUser`` post ``/recommend`` with real histories drawn from
a data set split (``--vstar-data DIR --vstar-split test``), and now and then
append an event to a load-test user's stored history (``/users/{id}/events``)
and ask for that user's recommendations by ``user_id``. Every knob is a locust
option that also reads an environment variable, so the same file serves
``vstar loadtest`` (which passes flags), a plain ``locust -f`` run and the
compose ``loadtest`` service (which sets variables)::

    locust -f loadtests/locustfile.py --headless -u 8 -r 8 -t 30s \
        --host http://127.0.0.1:8000 --vstar-data ../shared/data/amazon-industrial VedUser

Design decisions:
- Users are closed-loop with no think time by default (``--vstar-think-ms``),
  so the user count is the number of requests in flight: the x axis of the
  latency-vs-concurrency plot.
- Request names carry the mode (``/recommend [beam]``) so one locust run that
  mixes both classes (``--vstar-beam-weight`` / ``--vstar-ved-weight``) still
  reports them apart.
- A 200 whose body has fewer than k items is a failure: the service returns k
  whenever its catalog holds k SIDs, and a load test is where a shortcut under
  load would show (so ask for a k the catalog can fill).
- Locust has no column for ``cap_hit``; the counts of responses, cap hits,
  cached answers, VED fallbacks (initial beam, popularity) and VED tokens per
  mode go to ``PREFIX_extra.json`` (``--vstar-report PREFIX``) on quit, and
  ``loadtests.results`` joins them with the request statistics. Those are
  written on quit too, as ``PREFIX_final_stats.csv`` and
  ``PREFIX_final_failures.csv`` in locust's own ``_stats.csv`` and
  ``_failures.csv`` formats: locust's ``--csv`` files are rewritten once a
  second, so their last versions miss up to the final second of the run.
- Every point draws the same histories (``--vstar-seed``), so points compare
  like with like; against a server with its response cache on, a point then
  meets the answers the points before it cached (``vstar loadtest`` says so).
- Every locust process (each point of ``vstar loadtest``) names its users
  afresh, ``loadtest-<run>-<mode>-<n>`` with ``<run>`` drawn at its start, so
  every point's users start with no stored history: before, a later point's
  users read back the events the points before it had stored (up to the
  store's cap), so its stored-history requests decoded longer prompts. The
  old users' histories expire with the store's TTL (``VSTAR_HISTORY_TTL_S``).
- Both the counts and locust's statistics restart when all users are up
  (``--reset-stats``), so the ramp is never part of a point.
- Only loopback hosts are accepted (``loadtests.target``).
"""

from __future__ import annotations

import csv
import itertools
import json
import random
import secrets
from collections import defaultdict
from pathlib import Path
from typing import Any

from locust import HttpUser, events, task
from locust.env import Environment
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

from loadtests.histories import HistoryRow, HistorySampler, read_histories, split_path
from loadtests.request_names import EVENT_NAME, recommend_name
from loadtests.target import require_loopback

# flag, environment variable, type, default, help. Zero budget / cap = the server's default.
OPTIONS: tuple[tuple[str, str, type, object, str], ...] = (
    ("--vstar-data", "VSTAR_LT_DATA", str, "", "Data set folder holding <split>.csv"),
    ("--vstar-split", "VSTAR_LT_SPLIT", str, "test", "Split whose histories are sent"),
    ("--vstar-k", "VSTAR_LT_K", int, 10, "Items asked for per request"),
    ("--vstar-budget", "VSTAR_LT_BUDGET", int, 0, "VED token budget; 0 = server default"),
    ("--vstar-latency-ms", "VSTAR_LT_LATENCY_MS", int, 0, "VED latency cap in ms; 0 = server default"),
    ("--vstar-exclude-history", "VSTAR_LT_EXCLUDE_HISTORY", bool, False, "Ask the server to drop history items"),
    ("--vstar-beam-weight", "VSTAR_LT_BEAM_WEIGHT", int, 1, "Weight of BeamUser in a mixed run"),
    ("--vstar-ved-weight", "VSTAR_LT_VED_WEIGHT", int, 1, "Weight of VedUser in a mixed run"),
    ("--vstar-event-share", "VSTAR_LT_EVENT_SHARE", float, 0.1, "Share of tasks that post an event"),
    ("--vstar-sid-share", "VSTAR_LT_SID_SHARE", float, 0.0, "Share of histories sent as SID strings"),
    ("--vstar-think-ms", "VSTAR_LT_THINK_MS", float, 0.0, "Pause between one user's requests"),
    ("--vstar-seed", "VSTAR_LT_SEED", int, 0, "Seed of the history draws"),
    ("--vstar-api-key", "VSTAR_LT_API_KEY", str, "", "X-API-Key for event posts (a server with VSTAR_API_KEYS)"),
    ("--vstar-report", "VSTAR_LT_REPORT", str, "", "On quit write PREFIX_final_stats.csv and PREFIX_extra.json"),
)

# Filled once per locust process by the init and test_start listeners.
_environment: Environment | None = None
_sampler: HistorySampler | None = None
_user_numbers = itertools.count()
_run = ""  # this process's part of its users' ids, drawn at test_start
# mode -> {"responses", "cap_hits", "cached", "ved_tokens"}: what locust's CSV has no column for.
_extra: dict[str, dict[str, int]] = defaultdict(
    lambda: {"responses": 0, "cap_hits": 0, "cached": 0, "fallbacks": 0, "popular": 0, "ved_tokens": 0}
)


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    """The service's request knobs and the traffic mix, as locust flags with env fallbacks."""
    group = parser.add_argument_group("vstar", "V-STAR recommendation service load test")
    for flag, env, kind, default, help_text in OPTIONS:
        if kind is bool:
            group.add_argument(flag, env_var=env, action="store_true", help=help_text)
        else:
            group.add_argument(flag, env_var=env, type=kind, default=default, help=help_text)


@events.init.add_listener
def _apply_weights(environment: Environment, **_: Any) -> None:
    """Class weights come from options, which exist only once locust has parsed them."""
    global _environment
    _environment = environment
    opts = environment.parsed_options
    if opts is None:  # library use without a command line: keep the class defaults
        return
    if not 0.0 <= opts.vstar_event_share <= 1.0 or not 0.0 <= opts.vstar_sid_share <= 1.0:
        raise ValueError("--vstar-event-share and --vstar-sid-share must lie in [0, 1]")
    BeamUser.weight = opts.vstar_beam_weight
    VedUser.weight = opts.vstar_ved_weight


@events.test_start.add_listener
def _load_histories(environment: Environment, **_: Any) -> None:
    """Check the target and read the split once, before the first user starts."""
    global _sampler, _run
    opts = environment.parsed_options
    assert opts is not None, "locust parses its options before test_start"
    require_loopback(environment.host or "")
    if not opts.vstar_data:
        raise ValueError("--vstar-data DIR (or VSTAR_LT_DATA) is required: the folder with the split CSVs")
    _sampler = HistorySampler(read_histories(split_path(Path(opts.vstar_data), opts.vstar_split)), opts.vstar_seed)
    _run = secrets.token_hex(4)
    _extra.clear()


@events.spawning_complete.add_listener
def _reset_extra(user_count: int) -> None:
    """Restart the cap-hit counts where ``--reset-stats`` restarts locust's statistics."""
    assert _environment is not None
    if _environment.reset_stats:
        _extra.clear()


@events.quit.add_listener
def _write_report(exit_code: int) -> None:
    """Final statistics and the counts locust cannot hold, for ``vstar loadtest``."""
    assert _environment is not None and _environment.parsed_options is not None
    prefix = _environment.parsed_options.vstar_report
    if not prefix:
        return
    stats = StatsCSV(_environment, PERCENTILES_TO_REPORT)
    with open(f"{prefix}_final_stats.csv", "w", newline="") as f:
        stats.requests_csv(csv.writer(f))
    with open(f"{prefix}_final_failures.csv", "w", newline="") as f:
        stats.failures_csv(csv.writer(f))
    Path(f"{prefix}_extra.json").write_text(json.dumps(dict(_extra), indent=2) + "\n")


class RecommendUser(HttpUser):
    """One simulated client: a real history, a load-test user id, one request in flight at a time."""

    abstract = True
    mode = ""

    def wait_time(self) -> float:
        return self.environment.parsed_options.vstar_think_ms / 1000.0

    def on_start(self) -> None:
        assert _sampler is not None, "test_start listener did not run"
        number = next(_user_numbers)
        self.rng: random.Random = _sampler.stream(number)
        self.user_id = f"loadtest-{_run}-{self.mode}-{number}"
        self.has_events = False

    @task
    def step(self) -> None:
        """One request: an event (share ``--vstar-event-share``), else a recommendation."""
        opts = self.environment.parsed_options
        if self.rng.random() < opts.vstar_event_share:
            self.post_event()
        else:
            self.recommend()

    def recommend(self) -> None:
        assert _sampler is not None
        opts = self.environment.parsed_options
        row = _sampler.draw(self.rng)
        body = self.request_body(row)
        if self.has_events and self.rng.random() < 0.5:
            # stored history only: exercises the history store on the read path
            body.pop("history")
            body["user_id"] = self.user_id
        name = recommend_name(self.mode)
        with self.client.post("/recommend", json=body, name=name, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            payload = response.json()
            if len(payload.get("items", [])) < opts.vstar_k:
                response.failure(f"{len(payload.get('items', []))} items for k={opts.vstar_k}")
                return
            self.count(payload)

    def post_event(self) -> None:
        assert _sampler is not None
        row = _sampler.draw(self.rng)
        key = self.environment.parsed_options.vstar_api_key
        with self.client.post(
            f"/users/{self.user_id}/events",
            json={"items": [row.target]},
            headers={"X-API-Key": key} if key else None,
            name=EVENT_NAME,
            catch_response=True,
        ) as response:
            if response.status_code not in (200, 201, 204):
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            self.has_events = True

    def request_body(self, row: HistoryRow) -> dict[str, Any]:
        """The wire request for one history row, with this run's k / mode / budget / cap."""
        opts = self.environment.parsed_options
        as_sids = self.rng.random() < opts.vstar_sid_share
        body: dict[str, Any] = {
            "history": list(row.sids) if as_sids else list(row.item_ids),
            "k": opts.vstar_k,
            "mode": self.mode,
        }
        if opts.vstar_exclude_history:
            body["exclude_history"] = True
        if self.mode == "ved" and opts.vstar_budget:
            body["budget"] = opts.vstar_budget
        if self.mode == "ved" and opts.vstar_latency_ms:
            body["latency_ms"] = opts.vstar_latency_ms
        return body

    def count(self, payload: dict[str, Any]) -> None:
        counts = _extra[self.mode]
        counts["responses"] += 1
        counts["cap_hits"] += bool(payload.get("cap_hit"))
        counts["cached"] += bool(payload.get("cached"))
        search = payload.get("search") or {}
        counts["fallbacks"] += search.get("fallback") == "initial_beam"
        counts["popular"] += search.get("fallback") == "popular"
        counts["ved_tokens"] += int(search.get("tokens_spent", 0))


class BeamUser(RecommendUser):
    """Beam search, the service default."""

    mode = "beam"


class VedUser(RecommendUser):
    """Budgeted value-guided search under a latency cap."""

    mode = "ved"
