"""``create_app(settings)``: the FastAPI application, its lifespan and its middleware.

Lifespan loads everything once, before the first request: the checkpoint
(policy, SID catalog with item titles, value head), the store (a Redis pool or
the in-process store) and the recommender with its micro-batcher. A missing or
broken checkpoint raises here, so the server fails at startup, loudly, instead
of answering 500s later; a warm-up decode proves the model runs. Redis being
down at startup is not fatal: the service starts degraded and recovers when
Redis comes back (``service.redis_store``).

``/docs`` (Swagger UI) and ``/redoc`` load their scripts from assets the
``fastapi-offline`` package ships, so they render on a machine with no internet.

Middleware, outermost first: startup failures (lifespan only), request id +
access log, catch-all 500, body size limit, then FastAPI's routing and
exception handlers (``service.errors``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from transformers.utils import logging as hf_logging

from models.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint
from models.value_head import ValueHead, load_value_head, value_head_for
from service.availability import watch
from service.errors import StartupError, install_error_handling
from service.json_logs import configure_logging
from service.metrics import ServiceMetrics
from service.middleware import BodyLimitMiddleware, RequestContextMiddleware, StartupFailureMiddleware
from service.recommender import Recommender
from service.redis_store import RedisStore
from service.routes import build_router
from service.schemas import request_models
from service.settings import Settings
from service.stores import MemoryStore, Store

log = logging.getLogger("service.app")


def build_store(settings: Settings) -> Store:
    if settings.redis_url is None:
        return MemoryStore(
            settings.stored_history_max,
            settings.memory_cache_entries,
            settings.history_ttl_s,
            settings.idempotency_ttl_s,
        )
    return RedisStore(
        str(settings.redis_url),
        settings.stored_history_max,
        settings.redis_timeout_s,
        settings.redis_retry_after_s,
        settings.history_ttl_s,
        settings.idempotency_ttl_s,
        settings.redis_write_settle_s,
    )


def value_head_or_fresh(checkpoint: LoadedCheckpoint, device: str, warn: bool = True) -> ValueHead:
    """The checkpoint's value head; a fresh one (with a warning, unless ``warn`` is False: no VED request will
    come) when it has none, as SFT checkpoints do."""
    head = load_value_head(checkpoint, device, required=False)
    if head is not None:
        return head
    if warn:
        log.warning("checkpoint has no value head: VED runs with a freshly initialised one (fine for SFT checkpoints)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same head in every worker, so VED answers do not depend on which one serves
        return value_head_for(checkpoint.policy).eval()


def load_recommender(settings: Settings, metrics: ServiceMetrics, ved: bool = True) -> Recommender:
    """The model the settings name, ready to answer; ``ved``: whether VED requests may come (False: an offline
    run of beam search alone, not warned about a missing value head)."""
    if settings.checkpoint is None:
        raise CheckpointError("no checkpoint configured: set VSTAR_CHECKPOINT or pass --checkpoint")
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    t0 = time.perf_counter()
    checkpoint = load_checkpoint(settings.checkpoint, settings.device)
    recommender = Recommender(
        checkpoint, value_head_or_fresh(checkpoint, settings.device, ved), settings, build_store(settings), metrics
    )
    if settings.warmup:
        try:
            recommender.warmup()
        except BaseException:  # a start that fails here must not leave the model thread behind
            recommender.executor.shutdown(wait=True)  # the warm-up has ended: the thread is idle
            raise
    log.info(
        "model loaded",
        extra={
            "checkpoint": str(settings.checkpoint),
            "model_version": checkpoint.model_version,
            "items": checkpoint.policy.catalog.num_items,
            "external_ids": checkpoint.policy.catalog.external_ids is not None,  # answers name items by them too
            # VSTAR_UNAVAILABLE_ITEMS: the items never recommended, and the SIDs they took out of the search
            "unavailable_items": len(recommender.unavailable.items),
            "unavailable_entries_unknown": recommender.unavailable.unknown,  # passed over: not in the catalog
            "sids_offered": recommender.policy.trie.num_sids,
            "seconds": round(time.perf_counter() - t0, 2),
        },
    )
    return recommender


async def _refresh_gauges(metrics: ServiceMetrics, every_s: float = 1.0) -> None:
    """Multiprocess mode: this worker's gauges, as other workers' scrapes read them, at most ``every_s`` old."""
    while True:
        metrics.refresh()
        await asyncio.sleep(every_s)


def create_app(settings: Settings) -> FastAPI:
    configure_logging(settings.log_level)
    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar would be plain text amid the JSON lines
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            recommender = load_recommender(settings, metrics)
        except (CheckpointError, StartupError) as e:
            log.error("startup failed: %s", e)  # one line naming the file; StartupFailureMiddleware drops the trace
            raise
        recommender.start()
        # torch + transformers leave ~400k objects on the heap; a full collection walks all of them
        # (~300 ms on a busy 2-core box: the p99 of the beam benchmark). Freezing moves them out of
        # the collector's reach, so only objects made while serving are ever scanned.
        gc.collect()
        gc.freeze()
        if not await recommender.store.ping():
            if recommender.store.refusal is not None:
                message = f"redis refused the settings of REDIS_URL (or VSTAR_REDIS_URL): {recommender.store.refusal}"
                log.error("startup failed: %s", message)
                await recommender.close()
                gc.unfreeze()
                raise StartupError(message)
            hint = recommender.store.unreachable_hint()
            log.warning(
                "redis unreachable at startup; serving degraded until it answers" + (f" ({hint})" if hint else "")
            )
        app.state.recommender = recommender
        log.info("settings", extra={"settings": settings.model_dump(mode="json")})
        tasks = [asyncio.create_task(_refresh_gauges(metrics))] if metrics.multiprocess else []
        if (path := settings.unavailable_items) is not None and settings.unavailable_reload_s > 0:
            changes = watch(  # a changed file applied while serving (service.availability)
                path,
                settings.unavailable_reload_s,
                recommender.catalog,
                recommender.unavailable_version,
                recommender.apply_unavailable,
                recommender.refuse_unavailable,
            )
            tasks.append(asyncio.create_task(changes))
        try:
            yield
        finally:
            app.state.recommender = None
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await recommender.close()
            metrics.close()
            gc.unfreeze()  # back to the collector, or a stopped app's model would stay (tests start many apps)

    # /docs and /redoc from assets packaged with fastapi-offline, not a CDN: they render with no network
    app = FastAPIOffline(
        title="vstar recommendation service",
        version="1",
        summary="Generative recommendations over semantic IDs: beam search, or value-guided search under a cap.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.recommender = None
    app.include_router(build_router(request_models(settings), api_keys=bool(settings.api_keys)))
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    install_error_handling(app)  # adds the catch-all, outside the body limit
    app.add_middleware(RequestContextMiddleware, log_requests=settings.access_log)
    app.add_middleware(StartupFailureMiddleware)
    return app


def create_app_from_env() -> FastAPI:
    """uvicorn's factory for ``vstar serve`` (each worker process reads the environment)."""
    return create_app(Settings())
