"""The checked ``POST /recall`` and ``POST /recommend`` requests (the /rank parser's rules).

Both take ``context``: the served ranking models' declared context features, plus ``categories``,
a list of raw category ids, the allow-list the index query applies (it is not passed on to the
ranker). ``k`` above ``MTRANK_RECALL_MAX_K`` is a 422 naming ``k``; ``exclude`` holds raw item ids
(integers) never to return.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from service.errors import InvalidRequest
from service.request import ContextValue, QueryLimits, check_context, check_text_id

CATEGORIES = "categories"  # the context key holding the category allow-list
MAX_EXCLUDE = 10_000


@dataclass(frozen=True)
class RecallQuery:
    user_id: str
    k: int
    scene: str
    context: dict[str, ContextValue]  # for the ranker: without ``categories``
    allow: list[int] | None  # the category allow-list, None: every category
    exclude: list[int]
    size: int = 0  # /recommend only
    explain: bool = False  # /recommend only
    arms: dict[str, str] = field(default_factory=dict)  # /recommend: the X-Mtrank-Arm header's


def _bad(name: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{name}: {message}", field=name)


def _int(value: Any, name: str, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(name, f"must be an integer >= {minimum}")
    if maximum is not None and value > maximum:
        raise _bad(name, f"{value} exceeds the limit of {maximum} (MTRANK_RECALL_MAX_K)")
    return value


def _int_list(value: Any, name: str, limit: int) -> list[int]:
    if not isinstance(value, list) or len(value) > limit:
        raise _bad(name, f"must be a list of at most {limit} integers")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int):
            raise _bad(f"{name}[{i}]", "must be an integer")
    return value


def _body(raw: bytes, fields: frozenset[str]) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"body is not valid JSON: {e}", field="body") from e
    if not isinstance(data, dict):
        raise _bad("body", "must be a JSON object")
    unknown = sorted(set(data) - fields)
    if unknown:
        raise _bad(unknown[0], "unknown field")
    return data


def _common(data: dict[str, Any], limits: QueryLimits) -> tuple[str, str, dict[str, Any], Any]:
    user_id = check_text_id(data.get("user_id"), "user_id")
    scene = data.get("scene", "default")
    if not isinstance(scene, str) or scene not in limits.scenes:
        raise _bad("scene", f"unknown scene {scene!r} (configured: {sorted(limits.scenes)})")
    context = data.get("context", {})
    if not isinstance(context, dict):
        raise _bad("context", "must be an object")
    context = dict(context)
    allow = None
    if CATEGORIES in context:
        allow = _int_list(context.pop(CATEGORIES), f"context.{CATEGORIES}", MAX_EXCLUDE)
    return user_id, scene, check_context(context, limits.context_fields), allow


_RECALL = frozenset({"user_id", "k", "scene", "context", "exclude"})
_RECOMMEND = frozenset({"user_id", "size", "scene", "context", "explain"})


def parse_recall_request(raw: bytes, limits: QueryLimits, max_k: int) -> RecallQuery:
    """Decode and check a ``POST /recall`` body; raises InvalidRequest (422)."""
    data = _body(raw, _RECALL)
    user_id, scene, context, allow = _common(data, limits)
    k = _int(data.get("k", 100), "k", 1, max_k)
    exclude = _int_list(data.get("exclude", []), "exclude", MAX_EXCLUDE)
    return RecallQuery(user_id, k, scene, context, allow, exclude)


def parse_recommend_request(raw: bytes, limits: QueryLimits) -> RecallQuery:
    """Decode and check a ``POST /recommend`` body; k comes from the scene's config."""
    data = _body(raw, _RECOMMEND)
    user_id, scene, context, allow = _common(data, limits)
    size = _int(data.get("size", 20), "size", 1)
    explain = data.get("explain", False)
    if not isinstance(explain, bool):
        raise _bad("explain", "must be a boolean")
    return RecallQuery(user_id, 0, scene, context, allow, [], size, explain)
