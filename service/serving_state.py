"""What the service serves: the loaded models with their compiled ranking config.

:class:`ServingState` hands each request one consistent :class:`Served` view (models, ranking
config compiled against their outputs, feature assembler, request limits). It owns every way
that view changes and every question about it:

- a model swap by the registry watcher (service/runtime.py) is picked up by the next
  :meth:`~ServingState.served` call, which compiles the ranking config for the new models; if
  the config does not fit them, the previous pair keeps serving and readiness says so;
- :meth:`~ServingState.watch_config` polls the ranking config file, so a change reaches every
  worker; :meth:`~ServingState.reload` is ``POST /admin/reload`` (models and config together);
- :meth:`~ServingState.readiness` and :meth:`~ServingState.model_infos` answer ``/readyz`` and
  ``/models``.

A request takes its view once, at its start, so a reload that lands mid-request never mixes
versions.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtrank.spec import FeatureSpec
from mtrank.yamlio import KeyedError
from service.errors import NotReady, ReloadRejected
from service.features.assemble import Assembler
from service.features.store import FeatureStore
from service.metrics import Metrics
from service.ranking_config import RankingConfig, RankingConfigError, load_ranking_config
from service.request import QueryLimits
from service.runtime import ModelBundle, ModelManager, ModelNotLoaded, ReloadResult
from service.variants import Plan, VersionCache, compile_plan

log = logging.getLogger("mtrank.serving")


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
    fits_store: bool  # the models read the features the store's snapshot was built for
    plan: Plan  # each scene's experiment arms and shadows, compiled (service/variants.py)


class ServingState:
    """The served models and ranking config, their reloads and readiness.

    Args:
        manager: the loaded models and their registry watcher.
        store: the feature store (probed for readiness).
        store_spec: the spec the store's snapshot was opened with.
        ranking_path: the ranking config file, compiled against each model bundle.
        metrics: reload counters and the model-version info metric.
        max_candidates: the request limit handed to the parser.
    """

    def __init__(
        self,
        manager: ModelManager,
        store: FeatureStore,
        store_spec: FeatureSpec,
        ranking_path: Path,
        metrics: Metrics,
        max_candidates: int,
    ) -> None:
        self.manager = manager
        self.store = store
        self.metrics = metrics
        self.ranking_path = ranking_path
        self.max_candidates = max_candidates
        self._store_inputs = _inputs_sha(store_spec)
        # versions named by experiment arms, shadows and learned fusions, loaded once each
        self.versions = VersionCache(manager.registry, manager.load_runtime)
        self._served: Served | None = None
        self._rejected: ModelBundle | None = None  # swapped-in models the config did not fit
        self.rejected_reason: str | None = None
        self.served()  # compiles the ranking config against the loaded models: fails start-up

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
            self.metrics.set_models(served.bundle.versions, served.bundle.providers)
            return served
        self._accept(fresh)
        return fresh

    def limits(self) -> QueryLimits:
        """What a request may contain under the served models and config."""
        return self.served().limits

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
        fits = _inputs_sha(bundle.spec) == self._store_inputs
        try:
            plan = compile_plan(ranking, bundle, request_fields(bundle.spec), self.versions)
        except KeyedError as e:
            raise RankingConfigError(f"{self.ranking_path}: {e}") from e
        return Served(bundle, ranking, Assembler(bundle.spec), limits, fits, plan)

    def _accept(self, fresh: Served) -> None:
        self._served, self._rejected, self.rejected_reason = fresh, None, None

    # -- operations ---------------------------------------------------------------------------
    def _config_stamp(self) -> tuple[Any, ...] | None:
        """The config file's mtime and size, and what ``current`` names for every version the
        config refers to by name only (an arm's ``NAME``, a learned fusion's ``NAME``): promoting
        one of those reloads the config as editing the file does."""
        try:
            st = self.ranking_path.stat()
        except OSError:
            return None
        served = self._served
        unpinned = served.plan.unpinned if served is not None else frozenset()
        return (st.st_mtime_ns, st.st_size, self.versions.currents(unpinned))

    def reload_config(self) -> bool:
        """Recompile the ranking config file for the served models; keep the old one on error."""
        try:
            fresh = self._compile(self.manager.current())
        except RankingConfigError as e:
            log.error("ranking config rejected, still serving the old one: %s", e)
            self.metrics.model_reloads.labels(result="failure").inc()
            return False
        self._accept(fresh)
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
        """Name, version, execution provider, tasks and export metrics of each served model."""
        bundle = self.served().bundle
        return [
            {
                "name": rt.model.name,
                "version": rt.model.version,
                "provider": rt.provider,
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
        self._accept(fresh)
        if result.result == "unchanged":
            self.metrics.model_reloads.labels(result="success").inc()  # the config reloaded
        return {"models": result.versions, "model_reload": result.result, "ranking_config": "ok"}
