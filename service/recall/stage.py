"""The recall stage: user id -> history (one read) -> user tower -> filtered ANN query.

:meth:`Recaller.recall` is timed as ``mtrank_request_stage_seconds{stage="recall"}`` and does, in
order: one history read (service/recall/history_store.py); the user's attribute codes mapped to
the served version's vocabulary indices (one small table per history version and recall version,
built once: mtrank/history.py says why the record holds raw-value codes); the user tower and the
index query on the inference threads (both release the GIL). The index query carries the filters
(service/recall/index.py): never an item of the user's history, of the request's ``exclude`` list,
or outside the request's category allow-list.

Failure policy, said in ``degraded``:
- no history for the user (unknown, or no clicks): the popularity list under the same filters
  (``recall_popularity_fallback``); each item's score is then null and its source ``popularity``;
- the history store down or timing out: as above, plus ``recall_history_unavailable``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from mtrank.history import UserHistory
from service.errors import NotReady
from service.metrics import Metrics
from service.recall.history_store import HistoryStore, HistoryTables, HistoryUnavailable
from service.recall.index import PAD_ID
from service.recall.runtime import RecallManager, RecallModel

log = logging.getLogger("mtrank.recall")
SOURCE_ANN = "ann"
SOURCE_POPULARITY = "popularity"
_CACHED_MAPS = 8


@dataclass(frozen=True)
class Recalled:
    """What the recall stage returned for one user, best first."""

    model: RecallModel
    item_ids: np.ndarray  # (n,) int64 raw ids
    scores: np.ndarray  # (n,) float32; NaN for popularity items
    source: str  # SOURCE_ANN or SOURCE_POPULARITY
    degraded: list[str] = field(default_factory=list)


def _map_codes(model: RecallModel, tables: HistoryTables) -> list[np.ndarray]:
    """Per user field of the spec: code -> vocabulary index (last entry: code -1 -> OOV 0).

    A field the history does not carry maps every user to OOV (the cold-start value).
    """
    maps = []
    for f in model.spec.user_sparse:
        raw = tables.tables.get(f.name, [])
        maps.append(np.concatenate([f.encode_many(raw), [0]]).astype(np.int64))
    return maps


class Recaller:
    """The recall stage (module docstring).

    Args:
        manager: the served recall version and its watcher (None: recall is off).
        store: the user histories.
        metrics: the stage histogram and the degraded counter.
        executor: the inference threads (shared with the ranker).
        max_k: the largest k a request may ask for.
    """

    def __init__(
        self,
        manager: RecallManager,
        store: HistoryStore,
        metrics: Metrics,
        executor: ThreadPoolExecutor,
        max_k: int,
    ) -> None:
        self.manager = manager
        self.store = store
        self.metrics = metrics
        self.executor = executor
        self.max_k = max_k
        self._maps: dict[tuple[int, str], list[np.ndarray]] = {}

    def served(self) -> RecallModel:
        model = self.manager.current()
        if model is None:
            why = self.manager.last_error or "no version loaded yet"
            raise NotReady(f"recall model {self.manager.name!r} is not loaded: {why}")
        return model

    async def recall(
        self, user_id: str, k: int, exclude: Sequence[int] = (), allow: Sequence[int] | None = None
    ) -> Recalled:
        """Up to ``k`` items for the user under the filters, best first (module docstring)."""
        model = self.served()  # once: the version stays the same for the whole request
        degraded: list[str] = []
        with self.metrics.stage("recall"):
            history: UserHistory | None = None
            tables: HistoryTables | None = None
            try:
                tables, history = await self.store.fetch(user_id)
            except HistoryUnavailable as e:
                log.warning("history unavailable, recalling from popularity: %s", e)
                degraded.append("recall_history_unavailable")
            if tables is None or history is None or len(history.items) == 0:
                degraded.append("recall_popularity_fallback")
                ids = _popular(model, k, exclude, allow)
                scores = np.full(len(ids), np.nan, dtype=np.float32)
                return Recalled(model, ids, scores, SOURCE_POPULARITY, degraded)
            sparse = self._user_sparse(model, tables, history.codes)
            seen = np.union1d(history.items, np.asarray(exclude, dtype=np.int64))
            loop = asyncio.get_running_loop()
            ids, scores = await loop.run_in_executor(
                self.executor, _ann, model, sparse, history.items, seen, k, allow
            )
        return Recalled(model, ids, scores, SOURCE_ANN, degraded)

    def _user_sparse(
        self, model: RecallModel, tables: HistoryTables, codes: np.ndarray
    ) -> np.ndarray:
        key = (id(model), tables.version)
        maps = self._maps.get(key)
        if maps is None:
            if len(self._maps) >= _CACHED_MAPS:
                self._maps.clear()
            maps = self._maps[key] = _map_codes(model, tables)
        sparse = np.zeros((1, len(maps)), dtype=np.int64)  # (1, U)
        for j, f in enumerate(model.spec.user_sparse):
            if f.name in tables.fields:
                code = int(codes[tables.fields.index(f.name)])
                table = maps[j]
                sparse[0, j] = table[code] if 0 <= code < len(table) - 1 else 0
        return sparse


def _ann(
    model: RecallModel,
    sparse: np.ndarray,
    history: np.ndarray,
    seen: np.ndarray,
    k: int,
    allow: Sequence[int] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """User tower + filtered index query, on an inference thread -> (ids (n,), scores (n,))."""
    vectors = model.user_vectors(model.feed(sparse, [history]))  # (1, D)
    ids, scores = model.index.search(vectors, k, exclude=[seen], allow_categories=allow)
    keep = ids[0] != PAD_ID
    return ids[0][keep], scores[0][keep]


def _popular(
    model: RecallModel, k: int, exclude: Sequence[int], allow: Sequence[int] | None
) -> np.ndarray:
    """The most clicked items under the request's filters, at most k."""
    ids = model.popularity
    keep = ~np.isin(ids, np.asarray(exclude, dtype=np.int64))
    if allow is not None:
        keep &= np.isin(model.categories_of(ids), np.asarray(allow, dtype=np.int64))
    return ids[keep][:k]
