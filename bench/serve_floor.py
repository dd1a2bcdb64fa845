"""The floor of one ``POST /rank``: the work no implementation of the service can skip.

For a request of N candidates that is: decode its JSON body (``orjson.loads``), fetch the user,
the N items and the N exposure counters with one Redis ``MGET`` of ``1 + 2N`` keys (redis-py with
hiredis, keys already encoded), and one ONNX Runtime ``session.run`` on inputs already assembled
(one intra-op thread, the service's session options). The three are timed back to back in every
iteration, over the same bodies the load generator sends, so the sum is a per-request floor with
the same variance sources (cache misses, the other processes on the machine) as the service.

Everything the service does beyond it (HTTP, checks, key building, record decoding, assembly,
fusion, rules, the exposure reservation, metrics, the response) is its overhead, and
``service / floor`` is the number the serving targets are written against.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import redis

from mtrank.snapshot import Snapshot, exposure_key, item_key, user_key
from mtrank.spec import FeatureSpec
from service.features.assemble import Assembler
from service.features.store import utc_day

PARTS = ("parse", "mget", "inference")


@dataclass(frozen=True)
class Request:
    """One pre-built request: its body and what the floor needs to replay it."""

    body: bytes
    keys: list[bytes]  # [user, N items, N exposure counters], the service's MGET
    sparse: np.ndarray  # (N, S) int64, what the service would assemble
    dense: np.ndarray  # (N, D) float32


def make_requests(
    spec: FeatureSpec,
    snap: Snapshot,
    namespace: str,
    n: int,
    count: int,
    seed: int,
    context: dict[str, Any],
) -> list[Request]:
    """``count`` bodies of ``n`` distinct known items each, for random known users."""
    if n > len(snap.item_ids):
        raise ValueError(f"N = {n} candidates but the snapshot holds {len(snap.item_ids)} items")
    rng = np.random.default_rng([seed, n])
    assembler = Assembler(spec)
    day = utc_day()
    out = []
    for _ in range(count):
        urow = int(rng.integers(len(snap.user_ids)))
        rows = rng.choice(len(snap.item_ids), size=n, replace=False)  # (n,) distinct
        user_id = str(snap.user_ids[urow])
        item_ids = [str(i) for i in snap.item_ids[rows].tolist()]
        body = orjson.dumps(
            {
                "user_id": user_id,
                "candidates": [{"item_id": i} for i in item_ids],
                "size": 20,
                "context": context,
            }
        )
        keys = [user_key(namespace, snap.version, user_id)]
        keys += [item_key(namespace, snap.version, i) for i in item_ids]
        keys += [exposure_key(namespace, day, i) for i in item_ids]
        sparse, dense = assembler.assemble(snap.users[urow], snap.items[rows], context)
        out.append(Request(body, keys, sparse, dense))
    return out


def open_session(model_path: Path) -> ort.InferenceSession:
    """An ORT session with the service's options (service/runtime.py) and one thread."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def percentiles(ms: Sequence[float] | np.ndarray) -> dict[str, float]:
    v = np.asarray(ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {
        "p50": round(float(p50), 4),
        "p90": round(float(p90), 4),
        "p99": round(float(p99), 4),
        "max": round(float(v.max()), 4),
        "mean": round(float(v.mean()), 4),
        "n": len(v),
    }


def measure_floor(
    session: ort.InferenceSession,
    spec: FeatureSpec,
    requests: Sequence[Request],
    client: redis.Redis | None,
    iterations: int,
    warmup: int = 30,
) -> dict[str, Any]:
    """p50/p90/p99 (ms) of parse, MGET, inference and of their per-iteration sum.

    ``client`` None: the embedded store's floor (parse + inference, no Redis).
    """
    names = list(spec.task_names)
    feeds = [{spec.sparse_input: r.sparse, spec.dense_input: r.dense} for r in requests]
    times = np.zeros((iterations, 3))  # (iterations, parse/mget/inference) seconds
    perf = time.perf_counter
    for i in range(-warmup, iterations):
        k = i % len(requests)
        body, keys = requests[k].body, requests[k].keys
        t0 = perf()
        orjson.loads(body)
        t1 = perf()
        if client is not None:
            client.mget(keys)
        t2 = perf()
        session.run(names, feeds[k])
        t3 = perf()
        if i >= 0:
            times[i] = (t1 - t0, t2 - t1, t3 - t2)
    ms = times * 1e3
    out = {part: percentiles(ms[:, j]) for j, part in enumerate(PARTS) if client or j != 1}
    out["sum"] = percentiles(ms.sum(axis=1))
    return out


def inference_alone(
    session: ort.InferenceSession, spec: FeatureSpec, requests: Sequence[Request], iterations: int
) -> dict[str, float]:
    """Single-thread ``session.run`` latency (ms) on its own: the throughput target's basis."""
    names = list(spec.task_names)
    feeds = [{spec.sparse_input: r.sparse, spec.dense_input: r.dense} for r in requests]
    for f in feeds[:10]:
        session.run(names, f)
    ms = []
    for i in range(iterations):
        t0 = time.perf_counter()
        session.run(names, feeds[i % len(feeds)])
        ms.append((time.perf_counter() - t0) * 1e3)
    return percentiles(ms)
