"""The request path: features -> inference -> fusion -> rules -> reserve -> response.

:class:`Ranker` turns one checked :class:`~service.request.RankQuery` into a response body. Each
stage is timed into ``mtrank_request_stage_seconds{stage=...}`` (``parse`` and ``total`` are
timed by the route):

- ``features``: one store round trip (user, items, today's exposure counts) and assembly;
- ``inference``: the models, on the inference threads (ONNX Runtime releases the GIL);
- ``fusion``: the scene's formula, nothing else;
- ``rules``: every re-rank rule (service/rules.py), pure, no I/O. The rule weights are computed
  before fusion, because the formula reads ``rule_weight``; that part and the re-rank are one
  observation;
- ``reserve``: the atomic exposure reservation (service/exposure.py), the request's only write.

The request takes the served models and config once, at its start (service/serving_state.py),
so a reload that lands mid-request never mixes versions.

Failure policy (the service answers when it can, and says so in ``degraded``):
- feature store down or timing out: every entity takes its cold-start default
  (``feature_store_unavailable``);
- exposure reservation fails: the scene's ``exposure_cap.on_store_failure`` decides,
  ``fail_open`` serves the items unreserved, ``fail_closed`` withholds capped items, and every
  item when the features (so the items' own caps) were not read (``exposure_reservation_failed``
  either way);
- an item the atomic reservation refuses (another request took its last exposure) is replaced
  by the next one (``exposure_cap_race``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from mtrank.fusion import formula_inputs
from mtrank.snapshot import default_item_record, default_user_record
from mtrank.spec import FeatureSpec
from service.exposure import Reservation, reserve
from service.features.store import (
    FeatureStore,
    FeatureStoreError,
    FeatureStoreUnavailable,
    FetchResult,
    utc_day,
)
from service.metrics import Metrics
from service.ranking_config import DEFAULT_SCENE
from service.request import RankQuery
from service.request_ids import RequestIds
from service.response import Outcome, response_body
from service.rules import RerankResult, item_caps, rerank, rule_weight
from service.served_log import ServedLog, ServedRequest, spec_meta
from service.serving_state import Served, ServingState
from service.shadow import ShadowJob, ShadowRunner
from service.variants import Variant

log = logging.getLogger("mtrank.pipeline")


@dataclass
class Features:
    fetched: FetchResult
    from_store: bool  # False: the store was not read, every record is a default
    items: Any  # (N,) item records after request-time overrides
    sparse: np.ndarray  # (N, S) int64
    dense: np.ndarray  # (N, D) float32


class _Stopwatch:
    """Seconds spent inside its ``with`` blocks, summed: a stage that runs in parts."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._start


class Ranker:
    """Ranks candidates; see the module docstring for the stages and the failure policy.

    Args:
        state: the served models and ranking config.
        store: the feature store (features and exposure counters).
        metrics: stage histograms and counters.
        executor: the inference threads.
        shadows: runs the config's shadow models after responses (None: shadows are off).
        request_ids: mints each answer's request_id (events name it; service/request_ids.py).
        served_log: writes what the models saw for a sample of requests (None: off).
    """

    def __init__(
        self,
        state: ServingState,
        store: FeatureStore,
        metrics: Metrics,
        executor: ThreadPoolExecutor,
        shadows: ShadowRunner | None = None,
        request_ids: RequestIds | None = None,
        served_log: ServedLog | None = None,
    ) -> None:
        self.state = state
        self.store = store
        self.metrics = metrics
        self.executor = executor
        self.shadows = shadows
        self.request_ids = request_ids or RequestIds(os.urandom(32))
        self.served_log = served_log
        self._log_meta: dict[int, tuple[Any, str]] = {}  # id(bundle) -> (bundle, segment meta)

    async def rank(self, query: RankQuery) -> dict[str, Any]:
        """Run every stage for one checked request; returns the JSON-ready response body."""
        served = self.state.served()  # once: models + config stay consistent for this request
        scene_name = query.scene or DEFAULT_SCENE
        # the experiment arms of the scene pick the models, fusion and rules (service/variants.py)
        variant = served.plan.variant(scene_name, query.user_id, query.arms)
        rules_cfg, formula, bundle = variant.rules, variant.fusion, variant.bundle
        m = self.metrics
        degraded: list[str] = []
        now = datetime.now(UTC)
        day, today = utc_day(now), int(now.timestamp() // 86400)
        n = len(query.item_ids)

        with m.stage("features"):
            feats = await self._features(query, served, day, degraded)
        with m.stage("inference"):
            loop = asyncio.get_running_loop()
            outputs = await loop.run_in_executor(
                self.executor, bundle.run, feats.sparse, feats.dense
            )
        rules_time = _Stopwatch()
        with rules_time:  # part of the rules stage: the formula reads the weights
            weights = rule_weight(feats.items, rules_cfg, today)
        request_env = self._request_env(query, served)
        with m.stage("fusion"):
            env = formula_inputs(outputs, feats.items, weights[0], request_env)
            scores = formula.evaluate(env, n)  # (N,) f64, non-finite -> -inf
        with rules_time:
            result = rerank(
                scores, feats.items, feats.fetched.exposures, rules_cfg, query.size, today,
                weights=weights,
            )  # fmt: skip
        m.stage_seconds.labels(stage="rules").observe(rules_time.seconds)
        with m.stage("reserve"):
            cap_cfg = rules_cfg.exposure_cap
            caps = item_caps(feats.items["exposure_cap"], cap_cfg)  # (N,) < 0: uncapped
            reservation = await reserve(
                self.store, query.item_ids, result.ranked, caps, query.size, day,
                cap_cfg.on_store_failure, caps_known=feats.from_store or not cap_cfg.enabled,
                count=cap_cfg.count_on == "served",
            )  # fmt: skip
        if reservation.failed:
            degraded.append("exposure_reservation_failed")
        self._count_effects(result, reservation)
        for reason in degraded:
            m.degraded.labels(reason=reason).inc()
        outcome = Outcome(
            query, bundle, feats.fetched, outputs, formula, env, result, reservation, degraded,
            variant.arms, self.request_ids.mint(),
        )  # fmt: skip
        body = response_body(outcome)
        if variant.arms:
            served_scores = result.scores[reservation.order]
            for exp, arm in variant.arms:
                hist = m.arm_scores.labels(experiment=exp, arm=arm)
                for v in served_scores[np.isfinite(served_scores)].tolist():
                    hist.observe(v)
        if self.served_log is not None and self.served_log.sampled():
            self._log_served(body, query, scene_name, variant, feats, outputs, scores, reservation,
                             now)  # fmt: skip
        shadows = served.plan.shadows(scene_name)
        if shadows and self.shadows is not None and feats.from_store:
            job = ShadowJob(
                body["request_id"], query.item_ids, feats.sparse, feats.dense, feats.items,
                weights[0], request_env, outputs, scores, reservation.order,
            )  # fmt: skip
            self.shadows.submit(shadows, job)
        return body

    def _log_served(
        self, body: dict[str, Any], query: RankQuery, scene: str, variant: Variant,
        feats: Features, outputs: dict[str, np.ndarray], scores: np.ndarray,
        reservation: Reservation, now: datetime,
    ) -> None:  # fmt: skip
        """Queue this request's inputs, outputs and answer for the served-feature log."""
        assert self.served_log is not None
        bundle = variant.bundle
        cached = self._log_meta.get(id(bundle))
        if cached is None or cached[0] is not bundle:
            if len(self._log_meta) > 16:
                self._log_meta.clear()
            cached = self._log_meta[id(bundle)] = (
                bundle, spec_meta(bundle.spec, list(bundle.output_names))
            )  # fmt: skip
        self.served_log.record(ServedRequest(
            body["request_id"], now.timestamp(), query.user_id, query.item_ids, scene,
            ",".join(f"{e}={a}" for e, a in variant.arms),
            ",".join(f"{n}@{v}" for n, v in bundle.versions.items()),
            self.store.snapshot_version or "", feats.from_store, feats.sparse, feats.dense,
            scores, outputs, reservation.order, cached[1],
        ))  # fmt: skip

    async def _features(
        self, query: RankQuery, served: Served, day: str, degraded: list[str]
    ) -> Features:
        spec = served.bundle.spec
        n = len(query.item_ids)
        fetched: FetchResult | None = None
        if not served.fits_store:
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
        from_store = fetched is not None
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
        return Features(fetched, from_store, items, sparse, dense)

    def _request_env(self, query: RankQuery, served: Served) -> dict[str, float]:
        env: dict[str, float] = {}
        for f in served.bundle.spec.dense:
            if f.source == "context":
                raw = query.context.get(f.name)
                ok = isinstance(raw, int | float) and not isinstance(raw, bool)
                env[f.name] = float(raw) if ok else f.default  # type: ignore[arg-type]
        return env

    def _count_effects(self, result: RerankResult, reservation: Reservation) -> None:
        m, order = self.metrics, reservation.order
        capped = int(result.capped.sum())
        if capped:
            m.items_dropped.labels(reason="exposure_cap").inc(capped)
        raced = int(reservation.refused.sum())
        if raced:
            m.items_dropped.labels(reason="exposure_cap_race").inc(raced)
        withheld = int(reservation.withheld.sum())
        if withheld:
            m.items_dropped.labels(reason="exposure_cap_unreserved").inc(withheld)
        uncounted = int(reservation.uncounted.sum())
        if uncounted:
            m.exposures_uncounted.inc(uncounted)
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


def _defaults(spec: FeatureSpec, n: int) -> FetchResult:
    return FetchResult(
        user=default_user_record(spec),
        user_found=False,
        items=np.repeat(default_item_record(spec).reshape(1), n),  # (N,) records
        item_found=np.zeros(n, dtype=bool),
        exposures=np.zeros(n, dtype=np.int64),
    )
