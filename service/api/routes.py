"""HTTP routes: ``POST /rank``, ``/recall``, ``/recommend``, health and readiness, ``/metrics``,
``/models`` and admin reload.

``/rank`` reads the raw body itself (size checked before and while reading), parses it with
orjson and answers with orjson bytes; the request model is still declared in the OpenAPI schema
so ``/docs`` shows the full body.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.api.deps import AdminDep, Services, ServicesDep
from service.api.schemas import (
    ErrorBody,
    EventsResponse,
    ModelInfo,
    RankResponse,
    ReadyStatus,
    RecallResponse,
    RecommendResponse,
)
from service.errors import (
    InvalidRequest,
    NotReady,
    PayloadTooLarge,
    RankingError,
    json_response,
)
from service.events import parse_events
from service.experiments import ARM_HEADER, parse_arm_header
from service.metrics import Metrics
from service.recall.recommend import Recommender
from service.recall.request import parse_recall_request, parse_recommend_request
from service.request import parse_rank_request

SCHEMA_REF = "#/components/schemas/{model}"
_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorBody, "description": "body or candidate list too large"},
    422: {"model": ErrorBody, "description": "a field is invalid; `field` names it"},
    503: {"model": ErrorBody, "description": "model not loaded yet"},
}

router = APIRouter()
admin_router = APIRouter(prefix="/admin", tags=["admin"])


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes without buffering them."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequest("Content-Length must be an integer", field="content-length")
        if int(declared) > limit:
            raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _body_schema(model: str) -> dict[str, Any]:
    """The OpenAPI requestBody of a route that parses its body by hand."""
    ref = {"$ref": SCHEMA_REF.format(model=model)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


@dataclass
class _Account:
    scene: str = "invalid"  # until the body names one
    status: int = 500  # until the route answers
    body: dict[str, Any] | None = None  # the answer, once there is one

    def answered(self, body: dict[str, Any]) -> dict[str, Any]:
        self.status, self.body = 200, body
        return body


@contextmanager
def _accounted(metrics: Metrics) -> Iterator[_Account]:
    """Counts one ranking request in ``mtrank_requests_total{scene, status}`` and times it as the
    ``total`` stage, whatever way it ends (a RankingError's status, 500 for anything else); a
    request assigned to experiment arms is also counted and timed per arm."""
    account, start = _Account(), time.perf_counter()
    try:
        yield account
    except RankingError as e:
        account.status = e.status_code
        raise
    finally:
        elapsed = time.perf_counter() - start
        metrics.requests.labels(scene=account.scene, status=str(account.status)).inc()
        metrics.stage_seconds.labels(stage="total").observe(elapsed)
        body = account.body
        for arm in (body or {}).get("experiments", ()):
            exp, name = arm["experiment"], arm["arm"]
            metrics.arm_requests.labels(experiment=exp, arm=name, status=str(account.status)).inc()
            metrics.arm_seconds.labels(experiment=exp, arm=name).observe(elapsed)
            if body and body["degraded"]:
                metrics.arm_degraded.labels(experiment=exp, arm=name).inc()


def _forced_arms(request: Request, services: Services) -> dict[str, str]:
    """The ``X-Mtrank-Arm`` header's arms, checked against the served experiments."""
    raw = request.headers.get(ARM_HEADER)
    return parse_arm_header(raw, services.state.served().plan.arms) if raw else {}


@router.post(
    "/rank",
    response_model=None,
    responses={200: {"model": RankResponse}, **_ERRORS},
    openapi_extra=_body_schema("RankRequest"),
    tags=["ranking"],
)
async def rank(request: Request, services: ServicesDep) -> Response:
    """Rank the candidates for one user: features, model, fusion, re-rank rules."""
    metrics = services.metrics
    with _accounted(metrics) as account:
        with metrics.stage("parse"):
            body = await read_body(request, services.settings.max_body_bytes)
            query = parse_rank_request(body, services.state.limits())
        account.scene = query.scene
        query.arms = _forced_arms(request, services)
        metrics.candidates.observe(len(query.item_ids))
        result = account.answered(await services.ranker.rank(query))
        return json_response(result)


def _recommender(services: Services) -> Recommender:
    if services.recommender is None:
        raise NotReady("recall is off: set MTRANK_RECALL_MODEL to a recall model of the registry")
    return services.recommender


_RECALL_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    503: {"model": ErrorBody, "description": "recall off (MTRANK_RECALL_MODEL) or not loaded"},
}


@router.post(
    "/recall", response_model=None, responses={200: {"model": RecallResponse}, **_RECALL_ERRORS},
    openapi_extra=_body_schema("RecallRequest"), tags=["recall"],
)  # fmt: skip
async def recall(request: Request, services: ServicesDep) -> Response:
    """Candidates for one user: history, user tower, filtered ANN query (or popularity)."""
    recommender = _recommender(services)
    with services.metrics.stage("parse"):
        body = await read_body(request, services.settings.max_body_bytes)
        query = parse_recall_request(body, services.state.limits(), services.settings.recall_max_k)
    return json_response(await recommender.recall(query))


@router.post(
    "/recommend", response_model=None,
    responses={200: {"model": RecommendResponse}, **_RECALL_ERRORS},
    openapi_extra=_body_schema("RecommendRequest"), tags=["recall"],
)  # fmt: skip
async def recommend(request: Request, services: ServicesDep) -> Response:
    """Recall the scene's k candidates for the user, then rank them as /rank does."""
    metrics = services.metrics
    with _accounted(metrics) as account:
        recommender = _recommender(services)
        with metrics.stage("parse"):
            body = await read_body(request, services.settings.max_body_bytes)
            query = parse_recommend_request(body, services.state.limits())
        account.scene = query.scene
        query = dataclasses.replace(query, arms=_forced_arms(request, services))
        result = account.answered(await recommender.recommend(query))
        return json_response(result)


_EVENT_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorBody, "description": "body too large"},
    422: {"model": ErrorBody, "description": "an event is invalid; `field` names it"},
    503: {
        "model": ErrorBody,
        "description": "no Redis, or Redis cannot take the batch now "
        "(Retry-After; a retry is deduplicated)",
    },
}


@router.post(
    "/events", response_model=None, responses={200: {"model": EventsResponse}, **_EVENT_ERRORS},
    openapi_extra=_body_schema("EventsRequest"), tags=["events"],
)  # fmt: skip
async def events(request: Request, services: ServicesDep) -> Response:
    """Impressions, clicks, carts, collects, purchases and stays: checked, deduplicated by
    event_id, appended to the event stream (docs/operations.md)."""
    log_ = services.events
    if log_ is None:
        raise NotReady("events need Redis: set MTRANK_REDIS_URL")
    settings, metrics = services.settings, services.metrics
    body = await read_body(request, settings.max_body_bytes)
    batch = parse_events(body, settings.events_max_batch, settings.events_future_tolerance_s)
    count = services.state.served().ranking.count_on == "impression"
    done = await log_.append(batch, count_impressions=count)
    for kind, n in done.accepted.items():
        metrics.events.labels(type=kind, result="accepted").inc(n)
    for kind, n in done.duplicates.items():
        metrics.events.labels(type=kind, result="duplicate").inc(n)
    for kind, n in done.orphans.items():
        metrics.events_orphaned.labels(type=kind).inc(n)
    return json_response({
        "accepted": sum(done.accepted.values()), "duplicates": sum(done.duplicates.values()),
        "orphans": sum(done.orphans.values()),
    })  # fmt: skip


@router.get("/healthz", tags=["ops"])
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadyStatus, responses={503: {"model": ReadyStatus}})
async def readyz(services: ServicesDep) -> Response:
    """Readiness: models loaded and warmed, feature store reachable (503 with reasons if not)."""
    reasons = await services.state.readiness()
    body = {"ready": not reasons, "reasons": reasons}
    return json_response(body, 200 if not reasons else 503)


@router.get("/metrics", tags=["ops"], response_class=Response)
async def metrics(services: ServicesDep) -> Response:
    """Prometheus metrics (aggregated over workers in multiprocess mode)."""
    content, content_type = services.metrics.exposition()
    return Response(content, media_type=content_type)


@router.get("/models", response_model=list[ModelInfo], tags=["ops"])
async def models(services: ServicesDep) -> Response:
    """The loaded models: name, version, execution provider, tasks and export-time metrics."""
    return json_response(services.state.model_infos())


@admin_router.post("/reload", responses={401: {"model": ErrorBody}, 409: {"model": ErrorBody}})
async def reload(services: ServicesDep, _: AdminDep) -> Response:
    """Reload the models' current versions and the ranking config; the old keep serving on error."""
    return json_response(await services.state.reload())
