"""Shadow models: other versions score a sample of live requests, after the response, off its path.

A shadow (``shadows:`` in the ranking config, service/experiments.py) gets the request's
assembled features as the live models saw them, runs its own models and fusion, and is compared
with what was served:

- ``mtrank_shadow_kendall_tau{shadow}``: Kendall's tau-b between the served order of the live
  top-k and the shadow's scores of those same items (1: the shadow would order them alike);
- ``mtrank_shadow_topk_overlap{shadow}``: the share of the live top-k in the shadow's own top-k
  over every candidate;
- ``mtrank_shadow_score{shadow, side}``: the fused scores of each side's top-k, so a dashboard
  compares the two distributions (drift), and
  ``mtrank_shadow_output_shift{shadow, task}``: per request, the shadow's mean output of each task
  minus the live one (a calibration drift shows here first);
- ``mtrank_shadow_seconds{shadow}`` and ``mtrank_shadow_runs_total{shadow, result}``;
- a sampled log line (logger ``mtrank.shadow``, JSON) with both top-k lists.

**It never touches the response, nor the CPU the live requests need.**
:meth:`ShadowRunner.submit` is called once the response body is computed and only queues the job;
the route returns at once. The shadow is scored in its own process (spawned by the first
shadowed request of a worker, at nice 19, one thread), which loads the shadow's versions itself
(:class:`~service.variants.ShadowSpec`): a thread of the serving process would share its GIL, and
a low-priority thread preempted while it holds the GIL stalls every live request (priority
inversion), so only a separate process can leave the cores to live traffic. On a saturated
machine the shadow process gets almost no CPU: its jobs time out or are skipped, and the live
throughput stays (bench/experiments.py measures both). A job past ``timeout_ms`` counts as a
timeout; a shadow process still silent HANG_AFTER_S later is killed and started again, as is one
that died; more than ``max_in_flight`` jobs not yet answered, or a shadow process still starting,
are skipped ("busy"). Every outcome is counted by result and logged, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import multiprocessing
import os
import pickle
import queue
import random
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtrank.fusion import formula_inputs
from service.metrics import Metrics
from service.variants import CompiledShadow, ShadowSpec

log = logging.getLogger("mtrank.shadow")
TOTAL_BP = 10_000
# A job still unanswered this long after its timeout: the process is stuck (stopped, or a graph
# that does not return) and is killed. Longer than loading a version, which the first job of a
# shadow does in the child.
HANG_AFTER_S = 5.0


@dataclass(frozen=True)
class ShadowJob:
    """What the live request computed that a shadow needs (arrays are not modified later)."""

    request_id: str
    item_ids: list[str]
    sparse: np.ndarray  # (N, S) the assembled inputs the live models saw
    dense: np.ndarray  # (N, D)
    items: Any  # (N,) item records (attributes for the fusion)
    rule_weight: np.ndarray  # (N,)
    request_env: dict[str, float]
    live_outputs: dict[str, np.ndarray]  # task -> (N,)
    live_scores: np.ndarray  # (N,) fused, live
    served: np.ndarray  # positions of the returned items, in served order


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b of two (k,) arrays (ties handled); nan when either is constant."""
    dx = np.sign(x[:, None] - x[None, :])  # (k, k)
    dy = np.sign(y[:, None] - y[None, :])
    upper = np.triu_indices(len(x), 1)
    dx, dy = dx[upper], dy[upper]
    tx, ty = np.count_nonzero(dx), np.count_nonzero(dy)
    if tx == 0 or ty == 0:
        return float("nan")
    return float(np.sum(dx * dy) / np.sqrt(float(tx) * float(ty)))


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(k, len(scores))
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")]


class ShadowProcessDied(RuntimeError):
    """The shadow process exited or was killed before it answered."""


class _ShadowProcess:
    """One spawned child that scores shadow jobs, with a sender and a receiver thread here.

    Jobs go through a bounded queue to the sender thread (a pipe write can block while the child
    is busy: never on the event loop); answers are matched to their futures by job id.
    :meth:`restart` kills the child (a hang or a crash) and fails every pending future.
    """

    def __init__(self, queue_size: int) -> None:
        self._ctx = multiprocessing.get_context("spawn")  # no fork of a threaded server
        self._queue_size = queue_size
        self._lock = threading.Lock()
        self._pending: dict[int, Future[Any]] = {}
        self._ids = itertools.count()
        self._closed = False
        self.ready = threading.Event()  # set when the child has imported what it needs
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        self.ready = threading.Event()
        parent, child = self._ctx.Pipe()
        self.process = self._ctx.Process(
            target=_child_main, args=(child,), name="mtrank-shadow", daemon=True
        )
        self.process.start()
        child.close()
        self._conn: Any = parent
        self._jobs: queue.Queue[tuple[int, Any] | None] = queue.Queue(self._queue_size)
        threading.Thread(target=self._send, args=(parent, self._jobs), daemon=True,
                         name="mtrank-shadow-send").start()  # fmt: skip
        threading.Thread(target=self._receive, args=(parent,), daemon=True,
                         name="mtrank-shadow-recv").start()  # fmt: skip

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def submit(self, payload: Any) -> Future[Any] | None:
        """Queue one job; None when the queue is full (the caller counts it as busy)."""
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                return None
            job_id = next(self._ids)
            self._pending[job_id] = future
            try:
                self._jobs.put_nowait((job_id, payload))
            except queue.Full:
                del self._pending[job_id]
                return None
        return future

    @staticmethod
    def _send(conn: Any, jobs: queue.Queue[tuple[int, Any] | None]) -> None:
        while (item := jobs.get()) is not None:
            try:
                conn.send(item)
            except (OSError, ValueError):  # the child is gone: its futures fail on receive
                return

    def _receive(self, conn: Any) -> None:
        ready = self.ready
        while True:
            try:
                job_id, ok, result = conn.recv()
            except (EOFError, OSError):
                if self._fail_pending(conn):  # it died by itself: start a fresh one
                    self.restart()
                return
            if job_id is None:  # the child's "ready"
                ready.set()
                continue
            with self._lock:
                future = self._pending.pop(job_id, None)
            if future is not None and not future.done():
                if ok:
                    future.set_result(result)
                else:
                    future.set_exception(RuntimeError(result))

    def _fail_pending(self, conn: Any) -> bool:
        """Fail the jobs of a connection that ended; False if a restart or close ended it."""
        with self._lock:
            if conn is not self._conn or self._closed:
                return False  # a restart already replaced this connection and failed its jobs
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(ShadowProcessDied("the shadow process exited"))
        return True

    def restart(self, generation: int | None = None) -> None:
        """Kill the child (hung or dead) and start a fresh one; pending jobs fail.

        ``generation`` (:attr:`restarts` when the caller saw the problem): a no-op if another
        caller restarted it since, so many timed-out jobs of one hang restart it once.
        """
        with self._lock:
            if self._closed or (generation is not None and generation != self.restarts):
                return
            old_conn, old_proc, old_jobs = self._conn, self.process, self._jobs
            pending, self._pending = self._pending, {}
            self._conn = None
        old_proc.kill()
        old_proc.join(5)
        with contextlib.suppress(queue.Full):
            old_jobs.put_nowait(None)
        old_conn.close()
        for future in pending.values():
            if not future.done():
                future.set_exception(ShadowProcessDied("the shadow process was restarted"))
        with self._lock:
            if not self._closed:
                self.restarts += 1
                self._start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        with contextlib.suppress(queue.Full):
            self._jobs.put_nowait(None)
        self.process.kill()
        self.process.join(5)
        if self._conn is not None:
            self._conn.close()


class ShadowRunner:
    """Runs sampled shadow scorings after responses (module docstring).

    Args:
        metrics: the shadow metrics.
        max_in_flight: shadow jobs not yet answered beyond which new ones are skipped ("busy").
    """

    def __init__(self, metrics: Metrics, max_in_flight: int = 4) -> None:
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self._process: _ShadowProcess | None = None  # started by the first shadowed request
        self._in_flight = 0
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._random = random.Random()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def process(self) -> _ShadowProcess:
        if self._process is None:
            self._process = _ShadowProcess(queue_size=self.max_in_flight)
        return self._process

    def submit(self, shadows: list[CompiledShadow], job: ShadowJob) -> None:
        """Schedule every sampled shadow for ``job``; returns at once and never raises."""
        for shadow in shadows:
            try:
                self._submit_one(shadow, job)
            except Exception:  # a shadow must never fail the request that carried it
                log.exception("shadow %s: could not be scheduled", shadow.config.name)

    def _submit_one(self, shadow: CompiledShadow, job: ShadowJob) -> None:
        cfg = shadow.config
        if self._random.random() * TOTAL_BP >= cfg.sample_bp:
            return
        process = self.process
        future = None
        if process.ready.is_set():  # still starting: skipped, not queued
            with self._lock:
                slot = self._in_flight < self.max_in_flight
                if slot:
                    self._in_flight += 1
            if slot:
                future = process.submit((shadow.spec, _payload(job)))
                if future is None:
                    self._release()
        if future is None:
            self.metrics.shadow_runs.labels(shadow=cfg.name, result="busy").inc()
            return
        future.add_done_callback(self._release)
        task = asyncio.get_running_loop().create_task(
            self._finish(shadow, job, future, process.restarts)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _release(self, _: Any = None) -> None:
        with self._lock:
            self._in_flight -= 1

    async def _finish(
        self, shadow: CompiledShadow, job: ShadowJob, future: Future[Any], generation: int
    ) -> None:
        name = shadow.config.name
        start = time.perf_counter()
        try:
            # shielded: a timeout must not cancel the job, which keeps its slot until the
            # process answers or is restarted (a hung shadow makes the next ones skip)
            outputs, scores = await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(future)), shadow.config.timeout_ms / 1e3
            )
        except TimeoutError:
            self.metrics.shadow_runs.labels(shadow=name, result="timeout").inc()
            log.warning("shadow %s: no answer within %.0f ms", name, shadow.config.timeout_ms)
            if await asyncio.to_thread(self._hung, future):
                log.error("shadow process stuck for %.0f s: restarting it", HANG_AFTER_S)
                await asyncio.to_thread(self.process.restart, generation)
            return
        except Exception as e:
            self.metrics.shadow_runs.labels(shadow=name, result="error").inc()
            log.warning("shadow %s failed: %s: %s", name, type(e).__name__, e)
            return
        try:
            self._record(shadow, job, outputs, scores, time.perf_counter() - start)
        except Exception:
            self.metrics.shadow_runs.labels(shadow=name, result="error").inc()
            log.exception("shadow %s: comparison failed", name)

    def _record(
        self,
        shadow: CompiledShadow,
        job: ShadowJob,
        outputs: Mapping[str, np.ndarray],
        scores: np.ndarray,
        seconds: float,
    ) -> None:
        cfg, m = shadow.config, self.metrics
        live_top = job.served[: cfg.top_k]
        tau = kendall_tau_b(-np.arange(len(live_top), dtype=np.float64), scores[live_top])
        shadow_top = _top(scores, len(live_top)) if len(live_top) else live_top
        overlap = len(np.intersect1d(live_top, shadow_top)) / max(1, len(live_top))
        m.shadow_runs.labels(shadow=cfg.name, result="ok").inc()
        m.shadow_seconds.labels(shadow=cfg.name).observe(seconds)
        if tau == tau:
            m.shadow_tau.labels(shadow=cfg.name).observe(tau)
        m.shadow_overlap.labels(shadow=cfg.name).observe(overlap)
        # the top-k of each side (k observations, not N: this runs on the event loop)
        for side, values in (("live", job.live_scores[live_top]), ("shadow", scores[shadow_top])):
            hist = m.shadow_scores.labels(shadow=cfg.name, side=side)
            for v in values[np.isfinite(values)].tolist():
                hist.observe(v)
        for task, values in outputs.items():
            live = job.live_outputs.get(task)
            if live is not None:
                shift = float(np.mean(values) - np.mean(live))
                m.shadow_output_shift.labels(shadow=cfg.name, task=task).observe(shift)
        if self._random.random() * TOTAL_BP < cfg.log_sample_bp:
            ids = job.item_ids
            log.info(json.dumps({
                "event": "shadow", "shadow": cfg.name, "request_id": job.request_id,
                "models": shadow.bundle.versions, "seconds": round(seconds, 6),
                "kendall_tau": None if tau != tau else round(tau, 6),
                "topk_overlap": round(overlap, 6),
                "live_top": [ids[i] for i in live_top.tolist()],
                "shadow_top": [ids[i] for i in shadow_top.tolist()],
            }))  # fmt: skip

    def _hung(self, future: Future[Any]) -> bool:
        """Still unanswered HANG_AFTER_S after its timeout: the process is stuck or stopped."""
        deadline = time.monotonic() + HANG_AFTER_S
        while time.monotonic() < deadline:
            if future.done():
                return False
            time.sleep(0.01)
        return not future.done()

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Wait for scheduled shadow tasks (shutdown, tests); stragglers are left to time out."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    def close(self) -> None:
        if self._process is not None:
            self._process.close()


def _payload(job: ShadowJob) -> tuple[Any, ...]:
    """What the shadow process needs of a job (the rest stays here for the comparison)."""
    return job.sparse, job.dense, job.items, job.rule_weight, job.request_env


# ------------------------------------------------------------------ the shadow process
_BUILT: dict[bytes, tuple[Any, Any]] = {}  # pickled ShadowSpec -> (bundle, fusion), child only


def _build(spec: ShadowSpec) -> tuple[Any, Any]:
    """The shadow's bundle and fusion, loaded once per spec in the shadow process."""
    from mtrank.attributes import ITEM_ATTRIBUTES
    from mtrank.fusion import RULE_WEIGHT, FusionConfig
    from service.fusion_model import LtrRuntime
    from service.runtime import ModelBundle, ModelRuntime
    from service.variants import LtrFusion

    key = pickle.dumps(spec)  # the fusion config holds a dict: not hashable as such
    built = _BUILT.get(key)
    if built is None:
        bundle = ModelBundle(tuple(
            ModelRuntime.load(mv, providers="cpu", warmup_sizes=(1,)) for mv in spec.models
        ))  # fmt: skip
        if isinstance(spec.fusion, FusionConfig):
            names = {*bundle.output_names, *spec.request_fields,
                     *ITEM_ATTRIBUTES.formula_names, RULE_WEIGHT}  # fmt: skip
            fusion: Any = spec.fusion.compile(names)
        else:
            fusion = LtrFusion(LtrRuntime.load(spec.fusion))
        built = _BUILT[key] = (bundle, fusion)
    return built


def _child_main(conn: Any) -> None:
    """The shadow process: lowest priority, one thread each, answers jobs until the pipe ends."""
    with contextlib.suppress(OSError):
        os.nice(19)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    import service.fusion_model  # noqa: F401  (the imports a job needs, before "ready")
    import service.runtime  # noqa: F401
    import service.variants  # noqa: F401

    conn.send((None, True, "ready"))
    while True:
        try:
            job_id, (spec, payload) = conn.recv()
        except (EOFError, OSError):
            return
        try:
            result = _score(spec, payload)
        except Exception as e:  # the parent counts it as an error
            with contextlib.suppress(OSError):
                conn.send((job_id, False, f"{type(e).__name__}: {e}"))
            continue
        with contextlib.suppress(OSError):
            conn.send((job_id, True, result))


def _score(spec: ShadowSpec, payload: tuple[Any, ...]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The shadow's models and fusion over the live request's inputs."""
    sparse, dense, items, rule_weight, request_env = payload
    bundle, fusion = _build(spec)
    outputs = bundle.run(sparse, dense)
    env = formula_inputs(outputs, items, rule_weight, request_env)
    return outputs, fusion.evaluate(env, len(sparse))
