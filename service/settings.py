"""Service settings: one typed ``Settings`` read from the environment (prefix ``VSTAR_``).

Every limit a client can hit is a named setting here (but the ``Idempotency-Key``'s
1-128 characters, fixed in ``service.routes``), and the request schemas
take their ``Field`` bounds from these values (``service.schemas``), so the
OpenAPI document always shows the limits the server enforces. Tests build a
``Settings`` object instead of editing the environment.

``REDIS_URL`` is accepted under that bare name (the issue's contract, and the
usual name in compose files) as well as ``VSTAR_REDIS_URL``. Without it the
service uses in-process stores.

Secrets stay out of logs and reprs: the Redis URL dumps with its password
masked and is left out of ``repr``; API keys are ``SecretStr``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, RedisDsn, SecretStr, field_serializer, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.json_logs import redact_urls

# Redis takes TTLs and list lengths as integers its scripts would also see as such: bounded well inside that (a
# TTL past Redis's range failed the event-write script after its push, so a retry stored the events twice)
MAX_TTL_S = 10 * 365 * 24 * 3600


class Settings(BaseSettings):
    # no setting means nan or inf, and each would pass its bounds' checks (inf >= 0): a fusion weight of inf
    # answers every request with no items, a batch wait of inf never answers
    model_config = SettingsConfigDict(env_prefix="VSTAR_", extra="ignore", frozen=True, allow_inf_nan=False)

    # --- model
    checkpoint: Path | None = Field(None, description="Checkpoint folder; the app refuses to start without one.")
    device: str = Field("cpu", description="torch device the model runs on.")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads; None leaves torch's default.")
    warmup: bool = Field(True, description="Decode one request at startup, so a broken model fails the start.")
    fusion_weight: float | None = Field(
        None,
        ge=0,
        description="Weight of the shallow fusion with the checkpoint's transition counts, as vstar eval's "
        "--fusion-weight: None takes the checkpoint's chosen weight, 0 serves the policy alone.",
    )

    # --- stores
    redis_url: RedisDsn | None = Field(
        None,
        validation_alias=AliasChoices("REDIS_URL", "VSTAR_REDIS_URL", "redis_url"),
        repr=False,  # may carry a password
        description="Redis for histories and the response cache; unset = in-process stores.",
    )
    redis_timeout_s: float = Field(
        0.25, gt=0, le=60, description="Connect and command timeout; an outage costs at most this."
    )
    redis_retry_after_s: float = Field(1.0, ge=0, le=3600, description="After a Redis failure, skip Redis this long.")
    cache_ttl_s: int = Field(300, ge=0, le=MAX_TTL_S, description="Response cache TTL; 0 disables the cache.")
    memory_cache_entries: int = Field(10_000, ge=1, description="Size of the in-process response cache (LRU).")
    stored_history_max: int = Field(100, ge=1, le=1_000_000, description="Most recent events kept per user.")
    history_ttl_s: int = Field(
        30 * 24 * 3600,
        ge=0,
        le=MAX_TTL_S,
        description="A user's history expires this long after its last event; 0: never.",
    )
    idempotency_ttl_s: int = Field(
        24 * 3600,
        ge=1,
        le=MAX_TTL_S,
        description="How long an Idempotency-Key is remembered: a retry within it never stores twice.",
    )
    redis_write_settle_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="After an event write got no answer, how long to keep sending it again (it runs once, "
        "service.redis_store) before answering that the outcome is unknown.",
    )

    # --- write protection
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Keys that may write events (header X-API-Key), a comma list in VSTAR_API_KEYS; empty: writes "
        "are open, fine on loopback. Reads stay open either way.",
    )
    require_api_keys: bool = Field(
        False, description="Refuse to start without api_keys (compose sets it, so a deployment cannot forget them)."
    )

    # --- request limits (the schemas' Field bounds)
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Larger request bodies get 413.")
    max_k: int = Field(100, ge=1, description="Largest k a request may ask for.")
    default_k: int = Field(10, ge=1, description="k when a request gives none.")
    max_request_history: int = Field(100, ge=1, description="Most history entries one request may carry.")
    max_request_exclude: int = Field(
        100,
        ge=1,
        description="Most entries one request's exclude_items may carry (each SID it leaves without an item widens "
        "the search by one).",
    )
    max_events: int = Field(100, ge=1, description="Most events one POST may append.")
    max_user_id_length: int = Field(128, ge=1, description="User ids are 1..this many of [A-Za-z0-9_.@:-].")
    exclude_history_default: bool = Field(False, description="Drop items the user has, unless asked.")
    unavailable_items: Path | None = Field(
        None,
        description='A JSON file: an array of items never to recommend (item ids, SID strings, {"external_id": '
        "...} objects), read at startup and again when it changes; a SID left without an item leaves the search "
        "(service.availability).",
    )
    unavailable_reload_s: float = Field(
        10.0,
        ge=0,
        description="How often the service checks VSTAR_UNAVAILABLE_ITEMS for a change (seconds) and applies a "
        "changed file without a restart; a file that cannot be used is logged and the items in force kept. 0: "
        "read at startup only.",
    )

    # --- VED
    ved_default_latency_ms: int = Field(
        200,
        ge=1,
        description="VED cap when a request gives none: on a 2-core CPU host shared with training jobs a lone "
        "request's search ran for every request at 200 ms, at 100 ms for 0-99% of them (the initial beam "
        "answered the rest), at 50 ms never (README, vstar bench serve).",
    )
    ved_max_latency_ms: int = Field(1000, ge=1, description="Largest latency_ms a request may ask for.")
    ved_max_budget: int = Field(4096, ge=1, description="Largest VED token budget a request may ask for.")
    ved_margin_ms: float = Field(
        5.0, ge=0, description="Least time kept between VED's deadline and the cap (more is learnt: service.deadline)."
    )

    ved_store_share: float = Field(
        0.25,
        gt=0,
        le=1,
        description="Share of a VED request's time to its last chance that its store reads (stored history when "
        "the request carries its own, response cache) may take: a slower store is skipped for that request, as if "
        "unavailable, so a stalled Redis leaves the search the rest (its own timeout decides whether it is down).",
    )

    ved_respond_ms: float = Field(
        4.0,
        ge=0,
        description="Time kept after VED's last chance to answer for what the server's clock does not see "
        "(reading the request before it is stamped, sending the response, waits for the GIL on a busy host): a "
        "request whose decode has not finished by cap - this is answered from the popularity list (the hard cap).",
    )
    ved_init_cost_ms: float = Field(
        100.0,
        gt=0,
        le=60_000,
        description="VED's initial-tree and initial-beam costs assumed until measured (the "
        "warm-up times both per batch size); a request with less time left than the tree's gets the beam "
        "fallback, one with less than the beam's is answered from popularity at once (load shedding).",
    )

    model_thread_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="Niceness the model thread adds to the process's (Linux; 0 leaves it): on a busy CPU the event "
        "loop, which must answer at VED's hard cap, then wins the cores over model work, which is anytime.",
    )

    # --- beam micro-batching
    batch_max_size: int = Field(32, ge=1, description="Most requests merged into one decode; 1 disables batching.")
    batch_max_wait_ms: float = Field(
        2.0, ge=0, le=1000, description="How long the first request of a batch waits for company."
    )
    beam_between_ved_steps: bool = Field(
        True,
        description="Decode beam requests that arrive during a VED search between its forwards, not after it: "
        "beam's latency beside VED traffic for VED's (which searches less under mixed load; its cap holds).",
    )

    # --- logging
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="JSON logs on stderr.")
    access_log: bool = Field(True, description="One JSON line per request.")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        """A comma list. A JSON list (how pydantic-settings reads other list settings) would be split into keys
        such as '["key1"' that no client sends, so every write was a 401 with nothing said: refused by name."""
        if not isinstance(value, str):
            return value
        if value.lstrip().startswith("["):
            raise ValueError('a comma list of keys (key1,key2), not a JSON list (["key1", "key2"])')
        keys = [k.strip() for k in value.split(",") if k.strip()]
        for number, key in enumerate(keys, 1):  # named by its place, never shown: it is a secret
            if not (key.isascii() and key.isprintable()):
                raise ValueError(
                    f"key {number} holds a character outside printable ASCII: HTTP carries headers as Latin-1, so "
                    "no client sends it as configured (every write would be a 401)"
                )
        return keys

    @field_validator("redis_url")
    @classmethod
    def _numbered_database(cls, url: RedisDsn | None) -> RedisDsn | None:
        """The URL's path names a database by number (redis-py would use database 0 for any other), and
        redis-py can read the whole URL: its query's settings (``?db=``, ``?socket_timeout=``) were a traceback
        once the model had loaded. Nothing of the URL is echoed: a password holding '/', '?' or '#', not
        percent-encoded, ends the host early and leaves its tail in the path, the query or the fragment."""
        if url is None:
            return None
        if "@" in "".join(part or "" for part in (url.path, url.query, url.fragment)):
            raise ValueError(
                "an '@' after the host: a password holding '/', '?' or '#' must be percent-encoded (%2F, %3F, %23)"
            )
        database = (url.path or "").strip("/")
        if database and not database.isdigit():
            raise ValueError(f"the database in the Redis URL must be a number (redis://host:6379/0), got {database!r}")
        from redis.asyncio import ConnectionPool  # the store's reader of the URL; it connects to nothing here

        try:
            ConnectionPool.from_url(str(url)).make_connection()
        except ValueError as e:  # a setting of the query that is no number: its name, never its value
            raise ValueError(f"redis-py cannot read the Redis URL: {e}") from None
        except TypeError as e:  # a query parameter redis-py does not take (for this scheme): its name
            unknown = str(e).rsplit(" ", 1)[-1]
            raise ValueError(f"redis-py takes no query parameter {unknown} in this Redis URL") from None
        return url

    @field_validator("torch_threads")
    @classmethod
    def _threads_the_cores_can_run(cls, value: int | None) -> int | None:
        """No more threads than the cores this process may run on: 100,000 failed the start with a traceback
        (an mmap out of memory), 5,000 never finished the warm-up."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if value is not None and value > cores:
            raise ValueError(f"{value} threads, more than the {cores} CPU cores this process may run on")
        return value

    @field_validator("device")
    @classmethod
    def _usable_device(cls, value: str) -> str:
        """A device this machine has: checked with the settings, so a wrong one stops the start in one line."""
        if value != "cpu":
            from models.device import device_problem  # imports torch, which the CPU default does not need here

            problem = device_problem(value)
            if problem is not None:
                raise ValueError(problem)
        return value

    @field_serializer("redis_url")
    def _mask_password(self, url: RedisDsn | None) -> str | None:
        """Dumps (the startup log line) show the URL without its password; the store reads the field itself."""
        return None if url is None else redact_urls(str(url))

    @model_validator(mode="after")
    def _check_defaults_within_limits(self) -> Settings:
        if self.default_k > self.max_k:
            raise ValueError(f"VSTAR_DEFAULT_K={self.default_k} exceeds VSTAR_MAX_K={self.max_k}")
        if self.require_api_keys and not self.api_keys:
            raise ValueError("VSTAR_REQUIRE_API_KEYS is set but VSTAR_API_KEYS names no key (VSTAR_API_KEYS=key1,key2)")
        if self.ved_default_latency_ms > self.ved_max_latency_ms:
            raise ValueError(
                f"VSTAR_VED_DEFAULT_LATENCY_MS={self.ved_default_latency_ms} "
                f"exceeds VSTAR_VED_MAX_LATENCY_MS={self.ved_max_latency_ms}"
            )
        if self.ved_margin_ms + self.ved_respond_ms >= self.ved_max_latency_ms:
            raise ValueError(
                f"VSTAR_VED_MARGIN_MS={self.ved_margin_ms:g} plus VSTAR_VED_RESPOND_MS={self.ved_respond_ms:g} "
                f"leave no search time within VSTAR_VED_MAX_LATENCY_MS={self.ved_max_latency_ms}: every VED request "
                "would be answered by its fallback"
            )
        if self.ved_margin_ms + self.ved_respond_ms >= self.ved_default_latency_ms:
            raise ValueError(
                f"VSTAR_VED_MARGIN_MS={self.ved_margin_ms:g} plus VSTAR_VED_RESPOND_MS={self.ved_respond_ms:g} "
                f"leave no search time within VSTAR_VED_DEFAULT_LATENCY_MS={self.ved_default_latency_ms}: every VED "
                "request without latency_ms would be answered from popularity"
            )
        return self

    @property
    def batching(self) -> bool:
        return self.batch_max_size > 1
