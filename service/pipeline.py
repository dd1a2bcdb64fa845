"""The request path: features -> inference -> fusion -> rules -> response, each stage timed.

:class:`Ranker` owns the long-lived parts (model manager, feature store, ranking config,
inference threads) and turns one checked :class:`~service.api.schemas.RankQuery` into a response
body. A request takes the model bundle and the ranking config once, at its start, so a reload
that lands mid-request never mixes versions.

Failure policy (the service answers when it can, and says so):
- feature store down or timing out: every entity takes its cold-start default, the response
  lists ``feature_store_unavailable`` in ``degraded``;
- exposure reservation fails for the same reason: the items are returned unreserved
  (``exposure_reservation_failed``);
- an item the atomic reservation refuses (another request took its last exposure) is replaced
  by the next one (``exposure_cap_race``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from mtrank.fusion import Formula, formula_inputs
from mtrank.snapshot import default_item_record, default_user_record
from mtrank.spec import FeatureSpec
from service.api.schemas import QueryLimits, RankQuery
from service.errors import NotReady, ReloadRejected
from service.features.assemble import Assembler
from service.features.store import (
    FeatureStore,
    FeatureStoreError,
    FeatureStoreUnavailable,
    FetchResult,
    utc_day,
)
from service.metrics import Metrics
from service.ranking_config import (
    RankingConfig,
    RankingConfigError,
    SceneConfig,
    load_ranking_config,
)
from service.rules import RerankResult, fill_after_refusals, rerank, rule_weight
from service.runtime import ModelBundle, ModelManager, ModelNotLoaded, ReloadResult

log = logging.getLogger("mtrank.pipeline")
MAX_RESERVE_ROUNDS = 4  # refusals are rare races; a few refills are plenty


def request_fields(spec: FeatureSpec) -> list[str]:
    """Request-side numbers a formula may read: the spec's dense context features."""
    return [f.name for f in spec.dense if f.source == "context"]


def _inputs_sha(spec: FeatureSpec) -> str:
    return spec.model_copy(update={"outputs": []}).sha256()


@dataclass(frozen=True)
class Served:
    """One consistent view for a request: models, their ranking config, their assembler."""

    bundle: ModelBundle
    ranking: RankingConfig
    assembler: Assembler
    limits: QueryLimits
    inputs_sha: str  # checksum of the models' inputs: does the store's snapshot fit them?


@dataclass
class Features:
    fetched: FetchResult
    items: Any  # (N,) item records after request-time overrides
    sparse: np.ndarray  # (N, S) int64
    dense: np.ndarray  # (N, D) float32


class Ranker:
    """Ranks candidates; see the module docstring for the stages and the failure policy."""

    def __init__(
        self,
        manager: ModelManager,
        store: FeatureStore,
        store_spec: FeatureSpec,
        ranking_path: Path,
        metrics: Metrics,
        executor: ThreadPoolExecutor,
        max_candidates: int,
    ) -> None:
        self.manager = manager
        self.store = store
        self.metrics = metrics
        self.executor = executor
        self.ranking_path = ranking_path
        self.max_candidates = max_candidates
        self._store_inputs = _inputs_sha(store_spec)
        self._served: Served | None = None
        self._rejected: ModelBundle | None = None  # swapped-in models the config did not fit
        self.rejected_reason: str | None = None
        self.served()  # compiles the ranking config against the loaded models: fails start-up

    # -- what a request uses ------------------------------------------------------------------
    def served(self) -> Served:
        """The current models with their compiled ranking config (recompiled after a swap).

        If the watcher swapped in models the ranking config does not fit (a formula names an
        output the new models lack), the previous models and config keep serving: the old
        runtimes are still in memory, and ``/readyz`` reports the problem.
        """
        try:
            bundle = self.manager.current()
        except ModelNotLoaded as e:
            raise NotReady("no model is loaded yet") from e
        served = self._served
        if served is not None and (served.bundle is bundle or bundle is self._rejected):
            return served
        try:
            fresh = self._compile(bundle)
        except RankingConfigError as e:
            if served is None:
                raise
            log.error("models %s do not fit the ranking config, keeping %s: %s",
                      bundle.versions, served.bundle.versions, e)  # fmt: skip
            self._rejected, self.rejected_reason = bundle, str(e)
            self.metrics.model_reloads.labels(result="failure").inc()
            self.metrics.set_models(list(served.bundle.versions.items()),
                                    list(bundle.versions.items()))  # fmt: skip
            return served
        self._served, self._rejected, self.rejected_reason = fresh, None, None
        return fresh

    def _compile(self, bundle: ModelBundle) -> Served:
        """Load and compile the ranking config for ``bundle``; raises RankingConfigError."""
        names = [*bundle.output_names, *request_fields(bundle.spec)]
        ranking = load_ranking_config(self.ranking_path, names)
        limits = QueryLimits(
            max_candidates=self.max_candidates,
            scenes=frozenset(ranking.scenes),
            context_fields=frozenset(
                [f.name for f in bundle.spec.sparse if f.source == "context"]
                + [f.name for f in bundle.spec.dense if f.source == "context"]
            ),
        )
        # Hashing the spec serialises every vocabulary (ms per call): once per bundle, not per
        # request.
        return Served(bundle, ranking, Assembler(bundle.spec), limits, _inputs_sha(bundle.spec))

    def limits(self) -> QueryLimits:
        return self.served().limits

    # -- the request path ---------------------------------------------------------------------
    async def rank(self, query: RankQuery) -> dict[str, Any]:
        """Run every stage for one checked request; returns the JSON-ready response body."""
        served = self.served()  # once: models + config stay consistent for this request
        scene = served.ranking.scene(query.scene)
        formula = served.ranking.formula(query.scene)
        m = self.metrics
        degraded: list[str] = []
        now = datetime.now(UTC)
        day, today = utc_day(now), int(now.timestamp() // 86400)
        n = len(query.item_ids)

        with m.stage("features"):
            feats = await self._features(query, served, day, degraded)
        with m.stage("inference"):
            loop = asyncio.get_running_loop()
            # ORT releases the GIL: the event loop keeps serving while the model runs.
            outputs = await loop.run_in_executor(
                self.executor, served.bundle.run, feats.sparse, feats.dense
            )
        with m.stage("fusion"):
            weights = rule_weight(feats.items, scene.rules, today)
            env = formula_inputs(outputs, feats.items, weights[0], self._request_env(query, served))
            scores = formula.evaluate(env, n)  # (N,) f64, non-finite -> -inf
        with m.stage("rules"):
            result = rerank(
                scores, feats.items, feats.fetched.exposures, scene.rules, query.size, today,
                weights=weights,
            )  # fmt: skip
            order, refused = await self._reserve(query, scene, feats.items, result, day, degraded)
            self._count_effects(result, order, refused)

        for reason in degraded:
            m.degraded.labels(reason=reason).inc()
        body: dict[str, Any] = {
            "request_id": uuid.uuid4().hex,
            "model": _model_ref(served.bundle, 0),
            "models": [_model_ref(served.bundle, i) for i in range(len(served.bundle.runtimes))],
            "items": [],
            "degraded": degraded,
        }
        scores_out = result.scores
        if not query.explain:
            body["items"] = [
                {"item_id": query.item_ids[i], "score": _finite(scores_out[i])}
                for i in order.tolist()
            ]
            return body
        explainer = _Explain(query, feats, outputs, formula, env, result, refused)
        body["items"] = [explainer.item(i) for i in order.tolist()]
        body["dropped"] = explainer.dropped()
        return body

    async def _features(
        self, query: RankQuery, served: Served, day: str, degraded: list[str]
    ) -> Features:
        spec = served.bundle.spec
        n = len(query.item_ids)
        fetched: FetchResult | None = None
        if served.inputs_sha != self._store_inputs:
            # A reloaded model reads other features than the snapshot holds: defaults only.
            degraded.append("feature_spec_mismatch")
        else:
            try:
                fetched = await self.store.fetch(query.user_id, query.item_ids, day)
                self.metrics.feature_store_up.set(1)
            except FeatureStoreUnavailable as e:
                log.warning("feature store unavailable, serving defaults: %s", e)
                self.metrics.feature_store_up.set(0)
                degraded.append("feature_store_unavailable")
            except FeatureStoreError as e:
                log.error("feature store error, serving defaults: %s", e)
                degraded.append("feature_store_error")
        if fetched is None:
            fetched = _defaults(spec, n)
        else:
            m = self.metrics
            m.feature_lookups.labels(entity="user").inc()
            m.feature_lookups.labels(entity="item").inc(n)
            if not fetched.user_found:
                m.feature_misses.labels(entity="user").inc()
            misses = int(n - np.count_nonzero(fetched.item_found))
            if misses:
                m.feature_misses.labels(entity="item").inc(misses)
        items = fetched.items
        if query.overrides:
            items = served.assembler.override_items(items, query.overrides)
        sparse, dense = served.assembler.assemble(fetched.user, items, query.context)
        return Features(fetched, items, sparse, dense)

    def _request_env(self, query: RankQuery, served: Served) -> dict[str, float]:
        env: dict[str, float] = {}
        for f in served.bundle.spec.dense:
            if f.source == "context":
                raw = query.context.get(f.name)
                ok = isinstance(raw, int | float) and not isinstance(raw, bool)
                env[f.name] = float(raw) if ok else f.default  # type: ignore[arg-type]
        return env

    async def _reserve(
        self,
        query: RankQuery,
        scene: SceneConfig,
        items: Any,
        result: RerankResult,
        day: str,
        degraded: list[str],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Reserve one exposure per returned item atomically; refill refused slots.

        Returns the final order (item indices) and the (N,) mask of items refused by the cap.
        """
        n = len(query.item_ids)
        refused_items = np.zeros(n, dtype=bool)
        order = result.order
        if len(order) == 0:
            return order, refused_items
        cap_cfg = scene.rules.exposure_cap
        own = np.asarray(items["exposure_cap"], dtype=np.int64)  # (N,)
        # Reservation caps: < 0 means "count, never refuse" (the scene has no cap).
        caps = (
            np.where(own >= 0, own, cap_cfg.default_daily_cap) if cap_cfg.enabled else own * 0 - 1
        )
        ranked = result.ranked
        refused_pos = np.zeros(len(ranked), dtype=bool)  # over `ranked`
        reserved = np.zeros(n, dtype=bool)
        for _ in range(MAX_RESERVE_ROUNDS):
            order = fill_after_refusals(ranked, refused_pos, query.size)
            todo = order[~reserved[order]]
            if len(todo) == 0:
                return order, refused_items
            try:
                ids = [query.item_ids[i] for i in todo.tolist()]
                accepted = await self.store.reserve_exposures(ids, caps[todo], day)
            except FeatureStoreError as e:
                log.warning("exposure reservation failed, returning unreserved: %s", e)
                degraded.append("exposure_reservation_failed")
                return order, refused_items
            reserved[todo[accepted]] = True
            if accepted.all():
                return order, refused_items
            refused_items[todo[~accepted]] = True
            refused_pos |= refused_items[ranked]
        # Still refusing after several refills: return only what is reserved.
        return order[reserved[order]], refused_items

    def _count_effects(self, result: RerankResult, order: np.ndarray, refused: np.ndarray) -> None:
        m = self.metrics
        capped = int(result.capped.sum())
        if capped:
            m.items_dropped.labels(reason="exposure_cap").inc(capped)
        raced = int(refused.sum())
        if raced:
            m.items_dropped.labels(reason="exposure_cap_race").inc(raced)
        for name, fired in result.rule_effects.items():
            k = int(fired[order].sum())
            if k:
                m.rule_effects.labels(rule=name).inc(k)
        moved = int(np.count_nonzero(result.moved[order]))
        if moved:
            m.rule_effects.labels(rule="diversity_moved").inc(moved)
        fallback = int(result.diversity_fallback[order].sum())
        if fallback:
            m.rule_effects.labels(rule="diversity_fallback").inc(fallback)

    # -- operations ---------------------------------------------------------------------------
    def _config_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.ranking_path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def reload_config(self) -> bool:
        """Recompile the ranking config file for the served models; keep the old one on error."""
        try:
            fresh = self._compile(self.manager.current())
        except RankingConfigError as e:
            log.error("ranking config rejected, still serving the old one: %s", e)
            self.metrics.model_reloads.labels(result="failure").inc()
            return False
        self._served, self._rejected, self.rejected_reason = fresh, None, None
        self.metrics.model_reloads.labels(result="success").inc()
        log.info("ranking config %s reloaded", self.ranking_path)
        return True

    async def watch_config(self, interval_s: float) -> None:
        """Poll the ranking config file: every worker picks a changed file up by itself.

        ``POST /admin/reload`` reaches only the worker that receives it; this watcher is what
        brings a config change to all of them (and to every replica sharing the file).
        """
        stamp = self._config_stamp()
        while True:
            await asyncio.sleep(interval_s)
            now = self._config_stamp()
            if now is not None and now != stamp:
                stamp = now
                await asyncio.to_thread(self.reload_config)

    async def readiness(self) -> list[str]:
        """Why the service is not ready (empty: ready)."""
        reasons: list[str] = []
        if not self.manager.loaded:
            reasons.append("model_not_loaded")
        elif self._rejected is not None:
            # the watcher swapped in models the ranking config does not fit; older ones serve
            reasons.append("models_rejected_by_ranking_config")
        up = await self.store.ping()
        self.metrics.feature_store_up.set(1 if up else 0)
        if not up:
            reasons.append("feature_store_unreachable")
        return reasons

    def model_infos(self) -> list[dict[str, Any]]:
        bundle = self.served().bundle
        return [
            {
                "name": rt.model.name,
                "version": rt.model.version,
                "tasks": list(rt.output_names),
                "metrics": rt.metadata.get("metrics", {}),
            }
            for rt in bundle.runtimes
        ]

    async def reload(self) -> dict[str, Any]:
        """Reload models and ranking config; anything that fails its checks is rejected whole.

        The new pair is compiled before anything is swapped in, so a bad config (or models the
        config does not fit) leaves the old pair serving and the caller gets the reason.
        """
        result: ReloadResult = await asyncio.to_thread(self.manager.reload)
        if result.result == "failure":
            raise ReloadRejected(f"model reload rejected, still serving: {result.error}")
        bundle = self.manager.current()
        try:
            fresh = self._compile(bundle)
        except RankingConfigError as e:
            self.metrics.model_reloads.labels(result="failure").inc()
            self._rejected, self.rejected_reason = bundle, str(e)
            raise ReloadRejected(f"ranking config rejected, still serving the old one: {e}") from e
        self._served, self._rejected, self.rejected_reason = fresh, None, None
        if result.result == "unchanged":
            self.metrics.model_reloads.labels(result="success").inc()  # the config reloaded
        return {"models": result.versions, "model_reload": result.result, "ranking_config": "ok"}


def _model_ref(bundle: ModelBundle, i: int) -> dict[str, str]:
    mv = bundle.runtimes[i].model
    return {"name": mv.name, "version": mv.version}


def _finite(x: float) -> float | None:
    # JSON has no -inf: an item whose fused score was not finite reports null.
    return float(x) if np.isfinite(x) else None


def _defaults(spec: FeatureSpec, n: int) -> FetchResult:
    return FetchResult(
        user=default_user_record(spec),
        user_found=False,
        items=np.repeat(default_item_record(spec).reshape(1), n),  # (N,) records
        item_found=np.zeros(n, dtype=bool),
        exposures=np.zeros(n, dtype=np.int64),
    )


class _Explain:
    """Per-item explanation: predictions, fused-score factors, rule effects, feature misses."""

    def __init__(
        self,
        query: RankQuery,
        feats: Features,
        outputs: dict[str, np.ndarray],
        formula: Formula,
        env: dict[str, Any],
        result: RerankResult,
        refused: np.ndarray,
    ) -> None:
        n = len(query.item_ids)
        self.query, self.feats, self.result, self.refused = query, feats, result, refused
        self.outputs = {k: v.astype(np.float64).tolist() for k, v in outputs.items()}
        self.factors = {k: v.tolist() for k, v in formula.factors(env, n).items()}

    def item(self, i: int) -> dict[str, Any]:
        f = self.feats.fetched
        rules = self.result.explain(i)
        return {
            "item_id": self.query.item_ids[i],
            "score": _finite(self.result.scores[i]),
            "explain": {
                "predictions": {k: v[i] for k, v in self.outputs.items()},
                "factors": {k: _json_float(v[i]) for k, v in self.factors.items()},
                "rules": {**rules, "score": _finite(rules["score"])},
                "features": {"user_found": bool(f.user_found), "item_found": bool(f.item_found[i])},
            },
        }

    def dropped(self) -> list[dict[str, Any]]:
        out = []
        for i in np.flatnonzero(self.result.capped | self.refused).tolist():
            reason = "exposure_cap" if self.result.capped[i] else "exposure_cap_race"
            entry = self.item(i)
            del entry["score"]
            out.append({"reason": reason, **entry})
        return out


def _json_float(x: float) -> float | str:
    return x if np.isfinite(x) else str(x)
