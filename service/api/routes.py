"""HTTP routes: ``POST /rank``, health and readiness, ``/metrics``, ``/models`` and admin reload.

``/rank`` reads the raw body itself (size checked before and while reading), parses it with
orjson and answers with orjson bytes; the request model is still declared in the OpenAPI schema
so ``/docs`` shows the full body.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.api.deps import AdminDep, ServicesDep
from service.api.schemas import ErrorBody, ModelInfo, RankResponse, ReadyStatus
from service.errors import InvalidRequest, PayloadTooLarge, RankingError, json_response
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


@router.post(
    "/rank",
    response_model=None,
    responses={200: {"model": RankResponse}, **_ERRORS},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": SCHEMA_REF.format(model="RankRequest")}}
            },
        }
    },
    tags=["ranking"],
)
async def rank(request: Request, services: ServicesDep) -> Response:
    """Rank the candidates for one user: features, model, fusion, re-rank rules."""
    metrics = services.metrics
    start = time.perf_counter()
    scene, status = "invalid", 500
    try:
        with metrics.stage("parse"):
            body = await read_body(request, services.settings.max_body_bytes)
            query = parse_rank_request(body, services.state.limits())
        scene = query.scene
        metrics.candidates.observe(len(query.item_ids))
        result = await services.ranker.rank(query)
        status = 200
        return json_response(result)
    except RankingError as e:
        status = e.status_code
        raise
    finally:
        metrics.requests.labels(scene=scene, status=str(status)).inc()
        metrics.stage_seconds.labels(stage="total").observe(time.perf_counter() - start)


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
