"""Prometheus metrics of the service, under the fixed names the dashboards and alerts use.

One :class:`Metrics` object per app, on its own registry, so two apps in one process (tests) do
not share counts. With several uvicorn workers ``PROMETHEUS_MULTIPROC_DIR`` is set: prometheus
client then writes every value to per-process files, gauges declare how processes combine, and
:meth:`Metrics.exposition` aggregates the files with a ``MultiProcessCollector``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

STAGES = ("parse", "recall", "features", "inference", "fusion", "rules", "reserve", "total")
# Every reason the pipeline can put in `degraded`: their series start at 0, so rate() and
# increase() see the first degraded response after a start (a series born at 1 hides it).
DEGRADED_REASONS = (
    "feature_store_unavailable",
    "feature_store_error",
    "feature_spec_mismatch",
    "exposure_reservation_failed",
    "recall_popularity_fallback",
    "recall_history_unavailable",
)
# Most requests land between 1 ms and 50 ms; the tail buckets catch timeouts and GC pauses.
STAGE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
    0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
CANDIDATE_BUCKETS = (1, 10, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
# Fused scores: a formula's product is >= 0 and mostly small; a learned fusion's is a real number
# around 0. Both halves of the line, densest near 0.
SCORE_BUCKETS = (
    -10.0, -3.0, -1.0, -0.3, -0.1, 0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0,
    100.0,
)  # fmt: skip
TAU_BUCKETS = (-0.5, 0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)
SHARE_BUCKETS = (0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
SHIFT_BUCKETS = (-0.1, -0.03, -0.01, -0.003, -0.001, 0.0, 0.001, 0.003, 0.01, 0.03, 0.1)
# How often every worker rewrites its snapshot age: with several workers /metrics reads each
# worker's last written value, so a worker no scrape reaches must still keep its own current.
SNAPSHOT_AGE_UPDATE_S = 5.0


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """Every metric of the service, named as docs/api.md lists them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mtrank_requests", "Rank requests by scene and HTTP status", ["scene", "status"],
            registry=r,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "mtrank_request_stage_seconds", "Time spent per request stage", ["stage"],
            buckets=STAGE_BUCKETS, registry=r,
        )  # fmt: skip
        self.candidates = Histogram(
            "mtrank_request_candidates", "Candidates per rank request",
            buckets=CANDIDATE_BUCKETS, registry=r,
        )  # fmt: skip
        self.feature_lookups = Counter(
            "mtrank_feature_lookups", "Feature records looked up", ["entity"], registry=r
        )
        self.feature_misses = Counter(
            "mtrank_feature_misses", "Feature records missing (defaults used)", ["entity"],
            registry=r,
        )  # fmt: skip
        self.degraded = Counter(
            "mtrank_degraded_responses", "Responses served in a degraded mode", ["reason"],
            registry=r,
        )  # fmt: skip
        self.items_dropped = Counter(
            "mtrank_items_dropped", "Candidates dropped by a rule", ["reason"], registry=r
        )
        self.rule_effects = Counter(
            "mtrank_rule_effects", "Items touched by a re-rank rule", ["rule"], registry=r
        )
        # fail_open serves items whose exposure could not be reserved: caps may be exceeded by at
        # most this many exposures (fail_closed only serves uncapped items uncounted).
        self.exposures_uncounted = Counter(
            "mtrank_exposures_uncounted", "Items served without a counted exposure (store failed)",
            registry=r,
        )  # fmt: skip
        # max over live workers: a version any live worker serves shows 1. `provider` is the
        # execution provider the session really runs on (a CUDA that did not start shows CPU).
        self.model_info = Gauge(
            "mtrank_model_info", "Loaded model versions (1 = serving)",
            ["name", "version", "provider"], registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self._model_series: set[tuple[str, str, str]] = set()  # every model_info series set
        self.model_reloads = Counter(
            "mtrank_model_reloads", "Model / config reload attempts", ["result"], registry=r
        )
        # The recall version's hot reloads: a corrupt or mismatched version counts as a failure
        # (the old one keeps serving).
        self.recall_reloads = Counter(
            "mtrank_recall_reloads", "Recall model reload attempts", ["result"], registry=r
        )
        self.errors = Counter(
            "mtrank_errors", "Error responses by error class", ["type"], registry=r
        )
        # min over live workers: one worker that cannot reach the store shows the store down.
        self.feature_store_up = Gauge(
            "mtrank_feature_store_up", "Feature store reachable (1) or not (0)",
            registry=r, multiprocess_mode="livemin",
        )  # fmt: skip
        # max over live workers: the oldest snapshot any worker still serves. 0 while no
        # snapshot with a build time is known.
        self.snapshot_age = Gauge(
            "mtrank_feature_snapshot_age_seconds", "Seconds since the served snapshot was built",
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.snapshot_max_age = Gauge(
            "mtrank_feature_snapshot_max_age_seconds", "Snapshot age at which an alert fires",
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        # Experiments (service/experiments.py): a request in two layers counts once in each
        # layer's experiment, so these never add up to mtrank_requests_total across experiments.
        self.arm_requests = Counter(
            "mtrank_arm_requests", "Ranking requests per experiment arm and HTTP status",
            ["experiment", "arm", "status"], registry=r,
        )  # fmt: skip
        self.arm_seconds = Histogram(
            "mtrank_arm_request_seconds", "Ranking request latency per experiment arm",
            ["experiment", "arm"], buckets=STAGE_BUCKETS, registry=r,
        )  # fmt: skip
        self.arm_degraded = Counter(
            "mtrank_arm_degraded_responses", "Degraded responses per experiment arm",
            ["experiment", "arm"], registry=r,
        )  # fmt: skip
        self.arm_scores = Histogram(
            "mtrank_arm_served_score", "Fused score of each returned item, per experiment arm",
            ["experiment", "arm"], buckets=SCORE_BUCKETS, registry=r,
        )  # fmt: skip
        # POST /events (service/events.py)
        self.events = Counter(
            "mtrank_events", "Events received, by type and result (accepted, duplicate)",
            ["type", "result"], registry=r,
        )  # fmt: skip
        self.events_orphaned = Counter(
            "mtrank_events_orphaned", "Accepted events whose request_id this service did not mint",
            ["type"], registry=r,
        )  # fmt: skip
        # Served-feature log (service/served_log.py)
        self.served_log_rows = Counter(
            "mtrank_served_log_rows", "Served-feature log rows (candidates), written or dropped",
            ["result"], registry=r,
        )  # fmt: skip
        # Shadows (service/shadow.py): never part of a response.
        self.shadow_runs = Counter(
            "mtrank_shadow_runs", "Shadow scorings by outcome (ok, error, timeout, busy)",
            ["shadow", "result"], registry=r,
        )  # fmt: skip
        self.shadow_seconds = Histogram(
            "mtrank_shadow_seconds", "Shadow inference + fusion time", ["shadow"],
            buckets=STAGE_BUCKETS, registry=r,
        )  # fmt: skip
        self.shadow_tau = Histogram(
            "mtrank_shadow_kendall_tau", "Kendall tau of the shadow's scores on the live top-k",
            ["shadow"], buckets=TAU_BUCKETS, registry=r,
        )  # fmt: skip
        self.shadow_overlap = Histogram(
            "mtrank_shadow_topk_overlap", "Share of the live top-k in the shadow's top-k",
            ["shadow"], buckets=SHARE_BUCKETS, registry=r,
        )  # fmt: skip
        self.shadow_scores = Histogram(
            "mtrank_shadow_score", "Fused scores of every candidate, live and shadow side",
            ["shadow", "side"], buckets=SCORE_BUCKETS, registry=r,
        )  # fmt: skip
        self.shadow_output_shift = Histogram(
            "mtrank_shadow_output_shift", "Per request: mean shadow output - mean live output",
            ["shadow", "task"], buckets=SHIFT_BUCKETS, registry=r,
        )  # fmt: skip
        self._snapshot_built_at: Callable[[], float | None] = lambda: None
        # Children created up front so every fixed series is visible from the first scrape.
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)
        for entity in ("user", "item"):
            self.feature_lookups.labels(entity=entity)
            self.feature_misses.labels(entity=entity)
        # A counter series born at 1 makes increase() miss its first event (the reload-failure
        # alert would stay silent for the first bad model): start both results at 0.
        for result in ("success", "failure"):
            self.model_reloads.labels(result=result)
            self.recall_reloads.labels(result=result)
        for reason in DEGRADED_REASONS:
            self.degraded.labels(reason=reason)

    @contextmanager
    def stage(self, name: str, timings: dict[str, float] | None = None) -> Iterator[None]:
        """Time a block into ``mtrank_request_stage_seconds{stage=name}`` (and ``timings``)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.stage_seconds.labels(stage=name).observe(elapsed)
            if timings is not None:
                timings[name] = elapsed

    def set_models(self, versions: Mapping[str, str], providers: Mapping[str, str]) -> None:
        """Mark the served models (name -> version, name -> provider) 1, every other series 0."""
        serving = {(name, v, providers.get(name, "")) for name, v in versions.items()}
        for name, version, provider in self._model_series - serving:
            self.model_info.labels(name=name, version=version, provider=provider).set(0)
        for name, version, provider in serving:
            self.model_info.labels(name=name, version=version, provider=provider).set(1)
        self._model_series |= serving

    def track_snapshot(self, built_at: Callable[[], float | None], max_age_s: float) -> None:
        """Report the age of the snapshot whose build time ``built_at()`` gives (None: unknown)."""
        self._snapshot_built_at = built_at
        self.snapshot_max_age.set(max_age_s)
        self.update_snapshot_age()

    def update_snapshot_age(self, now: float | None = None) -> None:
        built = self._snapshot_built_at()
        now = time.time() if now is None else now
        self.snapshot_age.set(0.0 if built is None else max(0.0, now - built))

    async def keep_snapshot_age(self, interval_s: float = SNAPSHOT_AGE_UPDATE_S) -> None:
        """Update the snapshot age every ``interval_s`` (a task in every worker)."""
        while True:
            self.update_snapshot_age()
            await asyncio.sleep(interval_s)

    def exposition(self) -> tuple[bytes, str]:
        """The text format for ``GET /metrics``, aggregated over workers in multiprocess mode."""
        self.update_snapshot_age()  # this worker's exact; the others' at most a few seconds old
        path = multiprocess_dir()
        if path is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
