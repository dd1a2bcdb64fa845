"""Served-feature logging: what the models saw and said, for a sample of requests, on disk.

Layout and arrays: :mod:`mtrank.served_log`. ``MTRANK_SERVED_LOG_DIR`` turns it on;
``MTRANK_SERVED_LOG_SAMPLE`` (0..1) is the share of requests logged, drawn per request.

The request path only appends references to arrays it has already computed and never changes
(assembled inputs, outputs, scores) to an in-memory batch: no copy, no I/O. A writer thread
turns the batch into one segment every ``MTRANK_SERVED_LOG_FLUSH_S`` seconds or
``MTRANK_SERVED_LOG_MAX_ROWS`` rows, whichever comes first (concatenation and the file write run
there), and at shutdown. A full backlog (the writer cannot keep up: a slow disk) drops requests
rather than holding memory: counted in ``mtrank_served_log_rows_total{result="dropped"}``. A
segment that cannot be written is logged and counted the same way; serving never fails for it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from mtrank.served_log import OUTPUT_PREFIX, segment_meta
from service.metrics import Metrics

log = logging.getLogger("mtrank.served_log")


@dataclass(frozen=True)
class ServedRequest:
    """One logged request: references to what the ranking path computed (never modified)."""

    request_id: str
    ts: float
    user_id: str
    item_ids: list[str]
    scene: str
    arms: str
    models: str
    snapshot: str
    from_store: bool
    sparse: np.ndarray  # (N, S)
    dense: np.ndarray  # (N, D)
    score: np.ndarray  # (N,)
    outputs: dict[str, np.ndarray]  # task -> (N,)
    served: np.ndarray  # positions of the returned items, in order
    meta: str  # the input spec's segment meta (JSON), one per spec


def spec_meta(spec: Any, tasks: list[str]) -> str:
    """The segment meta of a feature spec (computed once per served bundle)."""
    sparse = [f.name for f in spec.sparse]
    dense = [f.name for f in spec.dense]
    sha = spec.model_copy(update={"outputs": []}).sha256()
    return json.dumps(segment_meta(sha, sparse, dense, tasks), sort_keys=True)


class ServedLog:
    """Samples requests and writes them as segments (module docstring)."""

    def __init__(
        self,
        directory: Path,
        sample: float,
        metrics: Metrics,
        *,
        flush_s: float = 5.0,
        max_rows: int = 100_000,
        max_backlog_rows: int = 1_000_000,
    ) -> None:
        self.directory = Path(directory)
        self.sample = sample
        self.metrics = metrics
        self.flush_s = flush_s
        self.max_rows = max_rows
        self.max_backlog_rows = max_backlog_rows
        self._random = random.Random()
        self._lock = threading.Condition()
        self._batch: list[ServedRequest] = []
        self._rows = 0
        self._stop = False
        self._writing = False
        self._flushing = False
        self._seq = 0
        # host, process and this writer's start: two writers never share a name (a restarted
        # app in one process starts its sequence again)
        self._prefix = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns() // 1_000_000}"
        self._thread = threading.Thread(target=self._run, name="mtrank-served-log", daemon=True)
        self._thread.start()

    def sampled(self) -> bool:
        return self.sample >= 1.0 or self._random.random() < self.sample

    def record(self, req: ServedRequest) -> None:
        """Queue one sampled request (references only; returns at once)."""
        n = len(req.item_ids)
        with self._lock:
            if self._rows + n > self.max_backlog_rows:
                self.metrics.served_log_rows.labels(result="dropped").inc(n)
                return
            self._batch.append(req)
            self._rows += n
            if self._rows >= self.max_rows:
                self._lock.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._stop and self._rows < self.max_rows and not self._flushing:
                    self._lock.wait(self.flush_s)
                batch, self._batch, self._rows = self._batch, [], 0
                stop = self._stop
                self._writing = bool(batch)
            if batch:
                self._write(batch)
            with self._lock:
                self._writing = False
                self._lock.notify_all()
            if stop:
                return

    def _write(self, batch: list[ServedRequest]) -> None:
        # one spec per segment: a reload that changed the inputs splits the batch
        groups: dict[str, list[ServedRequest]] = {}
        for req in batch:
            groups.setdefault(req.meta, []).append(req)
        for meta, reqs in groups.items():
            rows = sum(len(r.item_ids) for r in reqs)
            try:
                self._write_segment(meta, reqs)
            except Exception:  # a full disk must not stop serving
                log.exception("served log: a segment of %d rows could not be written", rows)
                self.metrics.served_log_rows.labels(result="dropped").inc(rows)
            else:
                self.metrics.served_log_rows.labels(result="written").inc(rows)

    def _write_segment(self, meta: str, reqs: list[ServedRequest]) -> Path:
        tasks = json.loads(meta)["tasks"]
        sizes = [len(r.item_ids) for r in reqs]

        def per_row(values: list[Any], dtype: Any) -> np.ndarray:
            return np.repeat(np.asarray(values, dtype=dtype), sizes)

        positions = []
        for r in reqs:
            pos = np.full(len(r.item_ids), -1, dtype=np.int32)
            pos[r.served] = np.arange(len(r.served), dtype=np.int32)
            positions.append(pos)
        arrays: dict[str, np.ndarray] = {
            "request_id": per_row([r.request_id for r in reqs], str),
            "ts": per_row([r.ts for r in reqs], np.float64),
            "user_id": per_row([r.user_id for r in reqs], str),
            "item_id": np.asarray([i for r in reqs for i in r.item_ids], dtype=str),
            "position": np.concatenate(positions),
            "scene": per_row([r.scene for r in reqs], str),
            "arms": per_row([r.arms for r in reqs], str),
            "models": per_row([r.models for r in reqs], str),
            "snapshot": per_row([r.snapshot for r in reqs], str),
            "from_store": per_row([r.from_store for r in reqs], bool),
            "sparse": np.concatenate([r.sparse for r in reqs]).astype(np.int64, copy=False),
            "dense": np.concatenate([r.dense for r in reqs]).astype(np.float32, copy=False),
            "score": np.concatenate([r.score for r in reqs]).astype(np.float64, copy=False),
            "meta": np.asarray(meta),
        }
        for t in tasks:
            arrays[OUTPUT_PREFIX + t] = np.concatenate([r.outputs[t] for r in reqs]).astype(
                np.float32, copy=False
            )
        day = datetime.fromtimestamp(reqs[0].ts, UTC).strftime("%Y%m%d")
        folder = self.directory / day
        folder.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        path = folder / f"{self._prefix}-{self._seq:06d}.npz"
        tmp = folder / f".{path.name}.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]  # numpy stub: allow_pickle kw
        os.replace(tmp, path)
        return path

    def flush(self, timeout_s: float = 30.0) -> None:
        """Write what is queued now and wait until it is on disk (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._flushing = True
            self._lock.notify_all()
            while (self._batch or self._writing) and time.monotonic() < deadline:
                self._lock.wait(0.05)
            self._flushing = False

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join(30)
