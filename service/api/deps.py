"""FastAPI dependencies: the app's long-lived objects and the admin guard, as typed aliases."""

from __future__ import annotations

import hmac
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from service.errors import NotReady, Unauthorized
from service.events import EventLog
from service.metrics import Metrics
from service.pipeline import Ranker
from service.recall.recommend import Recommender
from service.serving_state import ServingState
from service.settings import Settings


@dataclass
class Services:
    """What the lifespan builds once and every request reads: one per app (per worker)."""

    settings: Settings
    metrics: Metrics
    state: ServingState  # the served models and ranking config: reloads, readiness
    ranker: Ranker  # the request path
    executor: ThreadPoolExecutor
    recommender: Recommender | None = None  # None: MTRANK_RECALL_MODEL is unset (recall off)
    events: EventLog | None = None  # None: no Redis (MTRANK_REDIS_URL unset), /events is off


def get_services(request: Request) -> Services:
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None:
        raise NotReady("the service is starting")
    return services


def require_admin(request: Request, services: Annotated[Services, Depends(get_services)]) -> None:
    """Bearer token check in constant time; admin routes exist only when a token is configured."""
    expected = services.settings.admin_token
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if expected is None or scheme.lower() != "bearer" or not token:
        raise Unauthorized("admin routes need 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise Unauthorized("wrong admin token")


ServicesDep = Annotated[Services, Depends(get_services)]
AdminDep = Annotated[None, Depends(require_admin)]
