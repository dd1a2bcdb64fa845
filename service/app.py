"""``create_app()``: the FastAPI application, its start-up and shut-down.

The lifespan loads, in order, the models (validated against their spec and warmed by
:mod:`service.runtime`), the feature store (Redis, or the embedded snapshot), and the ranking
config compiled against the models' outputs; any of them failing stops start-up with a message
naming what is wrong. It then starts the registry watcher (hot reload) and freezes the GC: every
object allocated at start-up is long-lived, and keeping it out of collections shortens the
pauses that show up in p99 latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from prometheus_client.multiprocess import mark_process_dead

from mtrank import __version__
from mtrank.history import HISTORY_DIR, latest_history
from mtrank.registry import Registry
from mtrank.spec import FeatureSpec
from service.api.deps import Services
from service.api.routes import SCHEMA_REF, admin_router, router
from service.api.schemas import EventsRequest, RankRequest, RecallRequest, RecommendRequest
from service.errors import register_error_handlers
from service.events import EventLog
from service.features.embedded import EmbeddedFeatureStore
from service.features.redis_store import RedisFeatureStore
from service.features.store import FeatureStore, FeatureStoreError
from service.metrics import Metrics, multiprocess_dir
from service.pipeline import Ranker
from service.recall.history_store import (
    EmbeddedHistoryStore,
    HistoryStore,
    MissingHistoryStore,
    RedisHistoryStore,
)
from service.recall.recommend import Recommender
from service.recall.runtime import RecallManager, RecallReload
from service.recall.stage import Recaller
from service.request_ids import RequestIds
from service.runtime import ModelManager, ReloadResult
from service.served_log import ServedLog
from service.serving_state import ServingState
from service.settings import Settings, load_settings
from service.shadow import ShadowRunner

log = logging.getLogger("mtrank.app")
HISTORY_POLL_S = 5.0  # how often each worker re-reads the history pointer in Redis


def open_store(settings: Settings, spec: FeatureSpec) -> FeatureStore:
    """Redis when ``redis_url`` is set, else the snapshot file in process memory."""
    if settings.redis_url:
        return RedisFeatureStore(
            settings.redis_url,
            settings.feature_namespace or settings.model_names[0],
            spec,
            timeout_s=settings.redis_timeout_ms / 1000.0,
        )
    path = settings.snapshot_path
    if path is None:
        name = settings.model_names[0]
        path = Registry(settings.model_dir).latest_snapshot(name, spec.sha256())
        if path is None:
            raise FeatureStoreError(
                f"no feature snapshot for model {name!r} (spec {spec.sha256()[:12]}) under "
                f"{settings.model_dir}: set MTRANK_SNAPSHOT_PATH or MTRANK_REDIS_URL, or build "
                "one with `mtrank features build`"
            )
    return EmbeddedFeatureStore(path, spec)


def _reload_hook(metrics: Metrics) -> Any:
    def on_reload(result: ReloadResult) -> None:
        if result.result == "unchanged":
            return
        metrics.model_reloads.labels(result=result.result).inc()
        if result.result == "success":
            metrics.set_models(result.versions, result.providers)

    return on_reload


def open_history_store(settings: Settings, name: str) -> HistoryStore:
    """Redis when ``redis_url`` is set, else the history file in process memory.

    No history file is not a start-up failure: every user then gets the popularity fallback,
    flagged ``recall_history_unavailable``, and the log says what to build.
    """
    if settings.redis_url:
        return RedisHistoryStore(settings.redis_url, settings.history_namespace or name,
                                 settings.redis_timeout_ms / 1000.0)  # fmt: skip
    path = settings.history_path or latest_history(
        Registry(settings.model_dir).model_dir(name) / HISTORY_DIR
    )
    if path is None:
        why = (f"no history file for recall model {name!r} under {settings.model_dir}: set "
               "MTRANK_HISTORY_PATH or build one with `mtrank features build-history`")  # fmt: skip
        log.error(why)
        return MissingHistoryStore(why)
    return EmbeddedHistoryStore(path)


def _recall_hook(metrics: Metrics) -> Any:
    def on_reload(result: RecallReload) -> None:
        if result.result != "unchanged":
            metrics.recall_reloads.labels(result=result.result).inc()

    return on_reload


async def start_recall(
    settings: Settings, metrics: Metrics, state: ServingState, ranker: Ranker
) -> Recommender | None:
    """The recall stage when MTRANK_RECALL_MODEL is set. A version that does not load is not a
    start-up failure: /recall and /recommend answer 503 until a good one is promoted."""
    name = settings.recall_model
    if name is None:
        return None
    manager = RecallManager(settings.model_dir, name, on_reload=_recall_hook(metrics),
                            intra_op_threads=max(settings.ort_intra_threads, 1))  # fmt: skip
    await asyncio.to_thread(manager.reload)
    store = open_history_store(settings, name)
    recaller = Recaller(manager, store, metrics, ranker.executor, settings.recall_max_k)
    return Recommender(recaller, ranker, state, metrics)


async def start_services(settings: Settings, metrics: Metrics) -> Services:
    """Load models, store and ranking config; raises with a clear message on any problem."""
    manager = ModelManager(
        settings.model_dir,
        settings.model_names,
        providers=settings.ort_providers,
        intra_op_threads=settings.ort_intra_threads,
        on_reload=_reload_hook(metrics),
        variant=settings.model_variant,
    )
    await asyncio.to_thread(manager.reload, raise_on_error=True)
    spec = manager.current().spec
    store = open_store(settings, spec)
    executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="mtrank-ort")
    try:
        state = ServingState(
            manager, store, spec, settings.ranking_config, metrics, settings.max_candidates
        )
    except Exception:
        executor.shutdown(wait=False)
        await store.close()
        raise
    metrics.feature_store_up.set(1 if await store.ping() else 0)
    metrics.track_snapshot(lambda: store.snapshot_built_at, settings.snapshot_max_age_seconds)
    shadows = ShadowRunner(metrics, settings.shadow_max_in_flight)
    request_ids = request_ids_of(settings)
    served_log = None
    if settings.served_log_dir is not None:
        served_log = ServedLog(
            settings.served_log_dir, settings.served_log_sample, metrics,
            flush_s=settings.served_log_flush_s, max_rows=settings.served_log_max_rows,
        )  # fmt: skip
    ranker = Ranker(state, store, metrics, executor, shadows, request_ids, served_log)
    recommender = await start_recall(settings, metrics, state, ranker)
    events = None
    if settings.redis_url is not None:  # the event stream lives beside the features
        events = EventLog(
            settings.redis_url, settings.feature_namespace or settings.model_names[0],
            request_ids, timeout_s=settings.events_timeout_ms / 1e3,
            dedup_s=int(settings.events_dedup_hours * 3600),
            retention_s=int(settings.events_retention_hours * 3600),
        )  # fmt: skip
    return Services(settings, metrics, state, ranker, executor, recommender, events)


def request_ids_of(settings: Settings) -> RequestIds:
    """MTRANK_EVENTS_KEY, else a key every worker and replica of this deployment derives alike."""
    if settings.events_key is not None:
        return RequestIds(settings.events_key.encode())
    return RequestIds.derived(str(settings.model_dir.resolve()), *settings.model_names)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    services = await start_services(settings, app.state.metrics)
    app.state.services = services
    watchers: list[asyncio.Task[None]] = []
    if settings.reload_poll_seconds > 0:  # the models' `current` pointers
        watch = services.state.manager.watch(settings.reload_poll_seconds)
        watchers.append(asyncio.create_task(watch, name="mtrank-watch"))
    if settings.config_poll_seconds > 0:  # the ranking config file, in every worker
        watch_config = services.state.watch_config(settings.config_poll_seconds)
        watchers.append(asyncio.create_task(watch_config, name="mtrank-config"))
    recommender = services.recommender
    if recommender is not None and settings.reload_poll_seconds > 0:  # recall's `current`
        recall_watch = recommender.recaller.manager.watch(settings.reload_poll_seconds)
        watchers.append(asyncio.create_task(recall_watch, name="mtrank-recall-watch"))
    if recommender is not None and isinstance(recommender.recaller.store, RedisHistoryStore):
        history_watch = recommender.recaller.store.watch(HISTORY_POLL_S)
        watchers.append(asyncio.create_task(history_watch, name="mtrank-history"))
    age = app.state.metrics.keep_snapshot_age()  # every worker keeps its own value current
    watchers.append(asyncio.create_task(age, name="mtrank-snapshot-age"))
    gc.collect()
    gc.freeze()  # start-up objects live forever: keep them out of every future collection
    log.info("mtrank ready: models %s", services.state.manager.current().versions)
    try:
        yield
    finally:
        for watcher in watchers:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await services.state.store.close()
        if recommender is not None:
            await recommender.recaller.store.close()
        services.executor.shutdown(wait=False)
        if services.ranker.shadows is not None:
            services.ranker.shadows.close()
        if services.events is not None:
            await services.events.close()
        if services.ranker.served_log is not None:
            await asyncio.to_thread(services.ranker.served_log.close)  # writes what is queued
        app.state.services = None
        gc.unfreeze()
        if multiprocess_dir() is not None:  # drop this worker's live gauges from /metrics
            mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The generated schema plus the /rank body model (parsed by hand, so not inferred)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (RankRequest, RecallRequest, RecommendRequest, EventsRequest):
        body = model.model_json_schema(ref_template=SCHEMA_REF)
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
    app.openapi_schema = schema
    return schema


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ranking service; ``settings`` default to the ``MTRANK_*`` environment."""
    settings = settings or load_settings()
    metrics = Metrics()
    app = FastAPI(
        title="mtrank",
        version=__version__,
        summary="Online multi-task ranking: features, ONNX model, score fusion, re-rank rules",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.services = None
    register_error_handlers(app, metrics)
    app.include_router(router)
    if settings.admin_token is not None:  # no token: the admin routes do not exist at all
        app.include_router(admin_router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def app_factory() -> FastAPI:
    """Entry point for ``uvicorn --factory service.app:app_factory`` (each worker calls it)."""
    settings = load_settings()
    logging.basicConfig(level=settings.log_level.upper())
    return create_app(settings)
