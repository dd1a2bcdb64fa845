"""``/recall`` and ``/recommend`` bodies: the recall stage, then (for /recommend) the ranker.

``/recommend`` recalls the scene's ``recall.k`` candidates (service/ranking_config.py; capped at
``MTRANK_MAX_CANDIDATES``) and hands them to :class:`service.pipeline.Ranker` unchanged, as a
``/rank`` request would: features, models, fusion, rules, exposure reservation and ``explain``
are the ranking path's own. Each returned item then gains its recall score and source, and the
recall stage's ``degraded`` reasons come first in the response's list.
"""

from __future__ import annotations

from typing import Any

from service.metrics import Metrics
from service.pipeline import Ranker
from service.recall.request import RecallQuery
from service.recall.stage import Recalled, Recaller
from service.request import RankQuery
from service.serving_state import ServingState


def _model_ref(recalled: Recalled) -> dict[str, str]:
    mv = recalled.model.model
    return {"name": mv.name, "version": mv.version}


class _RecallInfo:
    """Each recalled item's recall score and source, by the item id text /rank names it with.

    Built per request over K (500) items, read back for the ~20 returned: the id -> position
    table is one ``dict(zip(...))`` and the scores stay an array until an item is annotated.
    """

    def __init__(self, recalled: Recalled) -> None:
        self.ids = list(map(str, recalled.item_ids.tolist()))
        self._pos = dict(zip(self.ids, range(len(self.ids)), strict=True))
        self._scores = recalled.scores
        self.source = recalled.source

    def __len__(self) -> int:
        return len(self.ids)

    def score(self, item_id: str) -> float | None:
        s = float(self._scores[self._pos[item_id]])
        return None if s != s else s  # NaN (popularity) -> None

    def items(self) -> list[dict[str, Any]]:
        return [{"item_id": i, "score": self.score(i), "source": self.source} for i in self.ids]


class Recommender:
    """The two recall routes over one :class:`Recaller` and the ranking path's :class:`Ranker`."""

    def __init__(
        self, recaller: Recaller, ranker: Ranker, state: ServingState, metrics: Metrics
    ) -> None:
        self.recaller = recaller
        self.ranker = ranker
        self.state = state
        self.metrics = metrics

    def _count(self, degraded: list[str]) -> None:
        for reason in degraded:
            self.metrics.degraded.labels(reason=reason).inc()

    async def recall(self, query: RecallQuery) -> dict[str, Any]:
        """The ``POST /recall`` body: items best first, with score and source."""
        recalled = await self.recaller.recall(query.user_id, query.k, query.exclude, query.allow)
        self._count(recalled.degraded)
        return {
            "request_id": self.ranker.request_ids.mint(),
            "model": _model_ref(recalled),
            "items": _RecallInfo(recalled).items(),
            "degraded": recalled.degraded,
        }

    async def recommend(self, query: RecallQuery) -> dict[str, Any]:
        """The ``POST /recommend`` body: the /rank body of the recalled candidates, annotated."""
        served = self.state.served()
        k = min(served.ranking.recall_k(query.scene), served.limits.max_candidates)
        recalled = await self.recaller.recall(query.user_id, k, query.exclude, query.allow)
        self._count(recalled.degraded)
        info = _RecallInfo(recalled)
        if not info:  # the filters left nothing to rank
            versions = served.bundle.versions
            refs = [{"name": n, "version": v} for n, v in versions.items()]
            body: dict[str, Any] = {"request_id": self.ranker.request_ids.mint(), "model": refs[0],
                                    "models": refs, "items": [], "degraded": []}  # fmt: skip
        else:
            body = await self.ranker.rank(
                RankQuery(
                    query.user_id,
                    info.ids,
                    query.size,
                    query.scene,
                    query.context,
                    query.explain,
                    arms=query.arms,
                )  # fmt: skip
            )
        for entry in [*body["items"], *(body.get("dropped") or [])]:
            entry["recall_score"], entry["source"] = info.score(entry["item_id"]), info.source
        body["recall_model"] = _model_ref(recalled)
        body["degraded"] = [*recalled.degraded, *body["degraded"]]
        return body
