"""Request and response shapes of the HTTP API, as pydantic models that document it.

These models feed the OpenAPI schema and ``/docs``. The hot path does not build them:
``POST /rank`` bodies are parsed by :func:`service.request.parse_rank_request`, which applies
the same rules (strict types, the same bounds) and which tests hold to these models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from mtrank.attributes import ITEM_ATTRIBUTES, Attribute
from service.request import MAX_ID_CHARS, ContextValue


def _override_field(attr: Attribute) -> Any:
    what = f"overrides the snapshot's {attr.name}"
    if attr.kind == "flag":
        return (bool | None, Field(None, description=what))
    return (float | None, Field(None, ge=attr.minimum, allow_inf_nan=False, description=what))


class _CandidateBase(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    item_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)


# One item to rank, with optional request-time overrides of the item attributes marked
# ``override`` in mtrank.attributes (documentation only: requests are parsed by
# parse_rank_request, which applies the same rules).
Candidate: type[BaseModel] = create_model(
    "Candidate",
    __base__=_CandidateBase,
    __doc__="One item to rank, with optional request-time attribute overrides.",
    **{a.name: _override_field(a) for a in ITEM_ATTRIBUTES if a.override},
)


class RankRequest(BaseModel):
    """Body of ``POST /rank``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    user_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    candidates: list[Candidate] = Field(min_length=1, description="unique item_ids")
    size: int = Field(20, ge=1, description="number of items to return")
    scene: str = Field("default", description="a scene of the ranking config")
    context: dict[str, ContextValue] = Field(
        default_factory=dict, description="request-side features declared by the model spec"
    )
    explain: bool = False


class ModelRef(BaseModel):
    name: str
    version: str


class RankedItem(BaseModel):
    item_id: str
    score: float | None = Field(description="null when the fused score is not finite (ranked last)")
    explain: dict[str, Any] | None = None


class DroppedItem(BaseModel):
    item_id: str
    reason: str
    explain: dict[str, Any] | None = None


class RankResponse(BaseModel):
    """Body of a successful ``POST /rank``."""

    request_id: str
    model: ModelRef
    models: list[ModelRef] = Field(default_factory=list, description="all models that scored")
    items: list[RankedItem]
    degraded: list[str] = Field(default_factory=list, description="reasons; empty when healthy")
    dropped: list[DroppedItem] | None = Field(None, description="only with explain")


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ModelInfo(BaseModel):
    name: str
    version: str
    provider: str = Field(description="ONNX Runtime execution provider the model runs on")
    tasks: list[str]
    metrics: dict[str, Any]


class ReadyStatus(BaseModel):
    ready: bool
    reasons: list[str]


class RecallRequest(BaseModel):
    """Body of ``POST /recall``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    user_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    k: int = Field(100, ge=1, description="items to return; at most MTRANK_RECALL_MAX_K")
    scene: str = Field("default", description="a scene of the ranking config")
    context: dict[str, ContextValue | list[int]] = Field(
        default_factory=dict,
        description="declared context features, and `categories`: a category allow-list",
    )
    exclude: list[int] = Field(default_factory=list, description="raw item ids never to return")


class RecommendRequest(BaseModel):
    """Body of ``POST /recommend``: recall (the scene's `recall.k`), then rank."""

    model_config = ConfigDict(extra="forbid", strict=True)
    user_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    size: int = Field(20, ge=1, description="number of items to return")
    scene: str = Field("default", description="a scene of the ranking config")
    context: dict[str, ContextValue | list[int]] = Field(
        default_factory=dict,
        description="declared context features, and `categories`: a category allow-list",
    )
    explain: bool = False


class RecalledItem(BaseModel):
    item_id: str
    score: float | None = Field(description="the user-item similarity; null from popularity")
    source: str = Field(description="`ann` (the index) or `popularity` (the fallback)")


class RecallResponse(BaseModel):
    """Body of a successful ``POST /recall``."""

    request_id: str
    model: ModelRef
    items: list[RecalledItem]
    degraded: list[str] = Field(default_factory=list)


class RecommendedItem(RankedItem):
    recall_score: float | None = Field(description="the item's recall score (null: popularity)")
    source: str = Field(description="`ann` or `popularity`")


class RecommendResponse(BaseModel):
    """Body of a successful ``POST /recommend``: a /rank body plus the recall stage's part."""

    request_id: str
    model: ModelRef
    models: list[ModelRef] = Field(default_factory=list)
    recall_model: ModelRef
    items: list[RecommendedItem]
    degraded: list[str] = Field(default_factory=list, description="recall's reasons first")
    dropped: list[DroppedItem] | None = Field(None, description="only with explain")


class EventIn(BaseModel):
    """One event of ``POST /events`` (service/events.py decodes the body itself, with msgspec)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    event_id: str = Field(pattern=r"^[A-Za-z0-9_.:\-]{1,128}$", description="unique per event")
    type: Literal["impression", "click", "cart", "collect", "purchase", "stay"]
    request_id: str = Field(
        pattern=r"^[A-Za-z0-9_.:\-]{1,128}$", description="the ranking answer it belongs to"
    )
    user_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    item_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    ts: float = Field(ge=0, description="when it happened, Unix seconds")
    amount: float | None = Field(None, ge=0, description="purchase: the amount paid (required)")
    seconds: float | None = Field(None, ge=0, description="stay: seconds on the item (required)")


class EventsRequest(BaseModel):
    """Body of ``POST /events``: 1..MTRANK_EVENTS_MAX_BATCH events."""

    model_config = ConfigDict(extra="forbid", strict=True)
    events: list[EventIn] = Field(min_length=1)


class EventsResponse(BaseModel):
    accepted: int = Field(description="events appended to the stream")
    duplicates: int = Field(description="events whose event_id was accepted before (not re-added)")
    orphans: int = Field(description="accepted events whose request_id this service did not mint")
