"""Typed errors of the service and the one place their HTTP handlers are registered.

Every error a client can see is a :class:`RankingError` subclass carrying its status and a public
message that is safe to show (it names the offending field, never internals). Anything else is
logged with its traceback and answered with a bare 500. Every 4xx/5xx is counted in
``mtrank_errors_total{type}``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from service.metrics import Metrics

log = logging.getLogger("mtrank.errors")


class RankingError(Exception):
    """Base error; ``status_code`` is the HTTP status, ``message`` is safe for clients."""

    status_code = 500
    error_type = "internal_error"
    headers: Mapping[str, str] | None = None  # extra response headers (e.g. Retry-After)

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def body(self) -> dict[str, Any]:
        detail: dict[str, Any] = {"type": self.error_type, "message": self.message}
        if self.field is not None:
            detail["field"] = self.field
        return {"error": detail}


class InvalidRequest(RankingError):
    """The request is well-formed JSON but a field is wrong (422, names the field)."""

    status_code = 422
    error_type = "invalid_request"


class PayloadTooLarge(RankingError):
    """Body bytes or candidate count over the configured limits (413)."""

    status_code = 413
    error_type = "payload_too_large"


class Unauthorized(RankingError):
    """Missing or wrong admin token (401)."""

    status_code = 401
    error_type = "unauthorized"


class NotReady(RankingError):
    """The model or the feature store is not loaded yet (503)."""

    status_code = 503
    error_type = "not_ready"


class EventsUnavailable(RankingError):
    """The event log (Redis) cannot take the batch now; the client retries it later (503).

    Nothing of the batch may have been kept, or all of it (a timeout after Redis ran the
    script): a retry is safe, because events are deduplicated by ``event_id``.
    """

    status_code = 503
    error_type = "events_unavailable"
    headers = {"Retry-After": "1"}


class ReloadRejected(RankingError):
    """A new model or ranking config failed its checks; the old one keeps serving (409)."""

    status_code = 409
    error_type = "reload_rejected"


class RecallIndexInvalid(ReloadRejected):
    """A recall index directory failed its checks (missing or corrupt file, checksum, dim).

    Raised by ``service.recall.index.RecallIndex.load`` before anything is swapped, so the index
    already loaded keeps serving (409 when an admin reload triggered it).
    """

    error_type = "recall_index_invalid"


def json_response(
    body: Any, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """orjson-encoded response (numpy scalars and arrays included)."""
    content = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(
        content, status_code=status_code, media_type="application/json", headers=headers
    )


def _field_path(loc: Sequence[int | str]) -> str:
    # ("body", "candidates", 3, "price") -> "candidates[3].price"
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def register_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Map every exception to a JSON error body and count it; no traceback leaves the process."""

    async def ranking_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RankingError)
        metrics.errors.labels(type=type(exc).__name__).inc()
        return json_response(exc.body(), exc.status_code, headers=exc.headers)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        err = InvalidRequest(str(first["msg"]), field=_field_path(first.get("loc", ())))
        metrics.errors.labels(type="RequestValidationError").inc()
        return json_response(err.body(), err.status_code)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        names = {404: "NotFound", 405: "MethodNotAllowed"}
        name = names.get(exc.status_code, f"HTTP{exc.status_code}")
        if exc.status_code >= 400:
            metrics.errors.labels(type=name).inc()
        body = {"error": {"type": name, "message": str(exc.detail)}}
        return json_response(body, exc.status_code, headers=exc.headers)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        metrics.errors.labels(type="InternalError").inc()
        return json_response(
            {"error": {"type": "internal_error", "message": "internal error"}}, 500
        )

    app.add_exception_handler(RankingError, ranking_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
