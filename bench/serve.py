"""Serving latency and throughput of ``mtrank serve``, against the floor measured in the same run.

``python -m bench.serve [--quick]``. Loopback only, every run bounded in time.

1. Prepare: synthetic e-commerce logs, an MMoE of the serving-benchmark size trained for a few
   steps only (latency does not depend on the weights' quality), exported through the real
   parity-gated exporter, its feature snapshot built and loaded into Redis under a private
   namespace (deleted at the end).
2. Start ``mtrank serve`` subprocesses on free ports: 1 and 2 workers, one ONNX Runtime intra-op
   thread each, with the Redis store and with the embedded store.
3. Drive them with ``wrk`` (C, keep-alive, a Lua script rotating pre-built bodies over users and
   candidate sets; a Python client adds more per request than the service's own overhead) or,
   where wrk is missing, a raw asyncio keep-alive client. Concurrency 1 for N = 100, 500, 1000;
   concurrency 8 and 32 at N = 500.
4. The floor of the same requests (bench/serve_floor.py): JSON parse + one MGET + session.run.
5. Per-stage means from the service's own ``mtrank_request_stage_seconds`` histogram, as the
   difference of two scrapes around each measured run (and the degraded responses, if any).
Results: bench/results/serve.json (``--quick``: a temporary folder) and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import CONFIGS, DATA, REPO, argv_of, format_table, output_paths, write_result
from bench.serve_floor import Request, inference_alone, make_requests, measure_floor, open_session
from bench.serve_floor import percentiles as pct
from harness.processes import free_port

NAME = "ecommerce"
REDIS_URL = "redis://127.0.0.1:6379/0"
CONTEXT = {"hour": 14, "device": "ios"}
# The serving-benchmark MMoE of the issue: 4 experts [256, 128], towers [64], 16-dim embeddings.
MODEL: dict[str, Any] = {
    "model.embed_dim": 16,
    "model.n_experts": 4,
    "model.expert_units": [256, 128],
    "model.tower_units": [64],
}
BODIES_PER_N = 64


@dataclass(frozen=True)
class Sizes:
    impressions: int
    train_steps: int
    c1_ns: tuple[int, ...]
    load_n: int
    concurrencies: tuple[int, ...]
    workers: tuple[int, ...]
    seconds: float  # measured duration of one load run
    warmup_seconds: float
    floor_iterations: int


FULL = Sizes(200_000, 30, (100, 500, 1000), 500, (8, 32), (1, 2), 8.0, 2.0, 1000)
QUICK = Sizes(20_000, 5, (100,), 100, (8,), (1,), 2.0, 0.5, 100)


# ------------------------------------------------------------------ 1. model and features
@dataclass
class World:
    root: Path
    model_path: Path
    spec: Any  # FeatureSpec
    snap: Any  # Snapshot
    snap_path: Path
    size: dict[str, Any]


def prepare_world(work: Path, s: Sizes) -> World:
    """Data -> a few training steps -> export -> snapshot; reused when the settings match."""
    from bench.common import make_config, one_thread, quiet
    from mtrank.registry import Registry
    from mtrank.snapshot import Snapshot
    from mtrank.spec import FeatureSpec
    from training.config import load_dataset_spec
    from training.data import prepare
    from training.export import export
    from training.features import build_snapshot, read_table
    from training.synthetic import generate_ecommerce
    from training.train import train

    marker = work / "world.json"
    # The exported graph depends on the model code too: a change there must rebuild the world.
    code = hashlib.sha256(
        b"".join(p.read_bytes() for p in sorted((REPO / "training" / "models").glob("*.py")))
    ).hexdigest()[:16]
    settings = {
        "impressions": s.impressions, "steps": s.train_steps, "model": MODEL, "seed": 0,
        "model_code": code,
    }  # fmt: skip
    root, data_dir = work / "models", work / "data"
    if not (marker.is_file() and json.loads(marker.read_text()) == settings):
        shutil.rmtree(work, ignore_errors=True)
        one_thread()  # a shared 2-core machine: training takes one core
        generate_ecommerce(data_dir, s.impressions, seed=0)
        ds = load_dataset_spec(CONFIGS / "ecommerce.dataset.yaml")
        ds = ds.model_copy(update={k: str(data_dir / f"{k}.parquet") for k in ("train", "valid")})
        ds = ds.model_copy(update={"test": None})
        overrides = {
            **MODEL,
            "epochs": 1,
            "max_steps": s.train_steps,
            "batch_size": 2048,
            "device": "cpu",
            "early_stopping": {"metric": "valid_loss", "patience": 1},
        }
        cfg = make_config(CONFIGS / "ecommerce_mmoe.yaml", ds, overrides)
        with quiet():
            result = train(cfg, work / "runs", prepare(cfg.dataset, work / "cache"))
        mv = export(result.best_checkpoint, NAME, root)
        spec = FeatureSpec.load(mv.path)
        snap = build_snapshot(
            spec, read_table(data_dir / "users.parquet"), read_table(data_dir / "items.parquet")
        )
        snap.save(Registry(root).snapshot_dir(NAME) / f"{snap.version}.npz")
        marker.write_text(json.dumps(settings))
    registry = Registry(root)
    mv = registry.resolve(NAME)
    spec = FeatureSpec.load(mv.path)
    snap_path = registry.latest_snapshot(NAME, spec.sha256())
    assert snap_path is not None, "snapshot missing after prepare"
    snap = Snapshot.load(snap_path, spec)
    return World(root, mv.model_path, spec, snap, snap_path, model_size(mv.model_path, spec, snap))


def model_size(model_path: Path, spec: Any, snap: Any) -> dict[str, Any]:
    """Parameters (embedding tables vs dense layers) and multiply-adds per candidate row."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(model_path)).graph
    emb = dense = macs = 0
    for init in graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim == 2 and w.shape[1] == MODEL["model.embed_dim"] and w.shape[0] > 64:
            emb += w.size  # the shared embedding table (all sparse fields, offset rows)
        elif w.dtype.kind == "f":
            dense += w.size
            if w.ndim >= 2 and "bias" not in init.name:
                macs += w.size  # every weight is one multiply-add per candidate row
    return {
        "sparse_fields": len(spec.sparse),
        "embed_dim": MODEL["model.embed_dim"],
        "dense_fields": len(spec.dense),
        "input_width": len(spec.sparse) * MODEL["model.embed_dim"] + len(spec.dense),
        "tasks": list(spec.task_names),
        "n_experts": MODEL["model.n_experts"],
        "expert_units": MODEL["model.expert_units"],
        "tower_units": MODEL["model.tower_units"],
        "vocab_sizes": {f.name: f.vocab_size for f in spec.sparse},
        "embedding_params": int(emb),
        "dense_params": int(dense),
        "macs_per_row": int(macs),
        "onnx_bytes": model_path.stat().st_size,
        "snapshot_users": len(snap.user_ids),
        "snapshot_items": len(snap.item_ids),
    }


def load_redis(snap: Any, namespace: str) -> dict[str, Any]:
    import redis

    from mtrank.snapshot_loader import load_snapshot_to_redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        return load_snapshot_to_redis(client, namespace, snap)
    finally:
        client.close()


def drop_namespace(namespace: str) -> int:
    """Delete every key of the private namespace (snapshot records and exposure counters)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    deleted = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"mtrank:{namespace}:*", count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                deleted += int(client.unlink(*batch))
                batch = []
        if batch:
            deleted += int(client.unlink(*batch))
    finally:
        client.close()
    return deleted


# ------------------------------------------------------------------ 2. servers
@contextlib.contextmanager
def server(world: World, workers: int, store: str, namespace: str, variant: str) -> Iterator[str]:
    """``mtrank serve`` on a free loopback port; yields its base URL, stops it on exit."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTRANK_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(
        MTRANK_MODEL_DIR=str(world.root),
        MTRANK_MODEL_NAMES=NAME,
        MTRANK_ORT_INTRA_THREADS="1",
        MTRANK_LOG_LEVEL="warning",
        MTRANK_FEATURE_NAMESPACE=namespace,
        OMP_NUM_THREADS="1",
    )
    if store == "redis":
        env["MTRANK_REDIS_URL"] = REDIS_URL
    else:
        env["MTRANK_SNAPSHOT_PATH"] = str(world.snap_path)
    mtrank = str(Path(sys.executable).with_name("mtrank"))
    args = [mtrank, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _ready(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"mtrank serve did not start:\n{log.read().decode()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session: the server and its workers
            proc.wait()
        log.close()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def check_response(url: str, req: Request) -> None:
    """One request answered in full and not degraded, or the benchmark measures nothing real."""
    r = urllib.request.Request(url + "/rank", req.body, {"content-type": "application/json"})
    with urllib.request.urlopen(r, timeout=10) as resp:
        body = json.loads(resp.read())
    if body["degraded"] or len(body["items"]) != 20:
        raise RuntimeError(
            f"unexpected /rank answer: degraded={body['degraded']}, {len(body['items'])} items"
        )


_STAGE = re.compile(r'^mtrank_request_stage_seconds_(sum|count)\{stage="(\w+)"\} (\S+)$', re.M)
_DEGRADED = re.compile(r'^mtrank_degraded_responses_total\{reason="(\w+)"\} (\S+)$', re.M)


def stage_totals(url: str) -> dict[str, list[float]]:
    """{stage: [sum_s, count]} from /metrics (all workers aggregated)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, list[float]] = {}
    for kind, stage, value in _STAGE.findall(text):
        out.setdefault(stage, [0.0, 0.0])[0 if kind == "sum" else 1] += float(value)
    for reason, value in _DEGRADED.findall(text):
        out.setdefault(f"degraded:{reason}", [0.0, 0.0])[1] += float(value)
    return out


def stage_means(before: dict[str, list[float]], after: dict[str, list[float]]) -> dict[str, float]:
    """Mean ms per stage over the requests between two scrapes."""
    out = {}
    for stage, (s1, c1) in after.items():
        s0, c0 = before.get(stage, [0.0, 0.0])
        if stage.startswith("degraded:"):
            out[stage] = c1 - c0  # responses served with default features, not a time
        elif c1 > c0:
            out[stage] = round((s1 - s0) / (c1 - c0) * 1e3, 4)
    return out


# ------------------------------------------------------------------ 3. load
WRK_LUA = """
local reqs = {}
local i = 0
function init(args)
  for line in io.lines(args[1]) do
    reqs[#reqs + 1] = wrk.format("POST", "/rank", {["Content-Type"] = "application/json"}, line)
  end
  i = math.random(#reqs)
end
function request()
  i = i % #reqs + 1
  return reqs[i]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\nRESULT {"requests": %d, "duration_us": %d, "errors": %d, "non2xx": %d, ' ..
    '"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
"""


def run_wrk(url: str, bodies: Path, conns: int, seconds: float, tmp: Path) -> dict[str, Any]:
    script = tmp / "rank.lua"
    script.write_text(WRK_LUA)
    args = [
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url + "/rank",
        "--",
        str(bodies),
    ]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60, check=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    r = json.loads(line[len("RESULT ") :])
    ms = {k: round(r[k] / 1e3, 4) for k in ("p50", "p90", "p99", "max", "mean")}
    return {
        **ms,
        "requests": r["requests"],
        "rps": round(r["requests"] / (r["duration_us"] / 1e6), 1),
        "errors": r["errors"] + r["non2xx"],
    }


async def _raw_load(port: int, reqs: list[bytes], conns: int, seconds: float) -> dict[str, Any]:
    """Keep-alive HTTP/1.1 over ``conns`` connections; per-request perf_counter latency."""
    lat: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def one(k: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k
        while time.perf_counter() < deadline and len(lat) < 1_000_000:
            t0 = time.perf_counter()
            writer.write(reqs[i % len(reqs)])
            head = await reader.readuntil(b"\r\n\r\n")
            m = re.search(rb"content-length: *(\d+)", head, re.I)
            await reader.readexactly(int(m.group(1)) if m else 0)
            lat.append(time.perf_counter() - t0)
            errors += not head.startswith(b"HTTP/1.1 200")
            i += 1
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(conns)))
    wall = time.perf_counter() - t0
    stats = pct(np.array(lat) * 1e3)
    stats["requests"] = stats.pop("n")
    return {**stats, "rps": round(len(lat) / wall, 1), "errors": errors}


def run_raw(url: str, requests: Sequence[Request], conns: int, seconds: float) -> dict[str, Any]:
    port = int(url.rsplit(":", 1)[1])
    head = "POST /rank HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    reqs = [f"{head}Content-Length: {len(r.body)}\r\n\r\n".encode() + r.body for r in requests]
    return asyncio.run(_raw_load(port, reqs, conns, seconds))


def load_run(
    url: str, requests: Sequence[Request], conns: int, s: Sizes, tmp: Path, client: str
) -> dict[str, Any]:
    """Warm up, then one measured run with per-stage means from /metrics."""
    bodies = tmp / f"bodies_{len(requests[0].keys)}.txt"
    if not bodies.exists():
        bodies.write_bytes(b"\n".join(r.body for r in requests) + b"\n")

    def go(seconds: float) -> dict[str, Any]:
        if client == "wrk":
            return run_wrk(url, bodies, conns, seconds, tmp)
        return run_raw(url, requests, conns, seconds)

    go(s.warmup_seconds)
    before = stage_totals(url)
    result = go(s.seconds)
    result["stages_ms"] = stage_means(before, stage_totals(url))
    return result


# ------------------------------------------------------------------ the run
def scenarios(s: Sizes, variant: str = "base") -> list[tuple[int, int, int]]:
    """(workers, concurrency, N) in run order."""
    out = [(1, 1, n) for n in s.c1_ns]
    if variant == "base" or len(s.workers) == 1:
        out += [(1, c, s.load_n) for c in s.concurrencies]
    for w in s.workers[1:]:
        out += [(w, c, s.load_n) for c in s.concurrencies]
    return out


def floors(world: World, reqs: dict[int, list[Request]], s: Sizes) -> dict[str, Any]:
    import redis

    session = open_session(world.model_path)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        out: dict[str, Any] = {}
        for n, rs in reqs.items():
            out[str(n)] = {
                "redis": measure_floor(session, world.spec, rs, client, s.floor_iterations),
                "embedded": measure_floor(session, world.spec, rs, None, s.floor_iterations),
            }
        inf = inference_alone(session, world.spec, reqs[s.load_n], s.floor_iterations)
    finally:
        client.close()
    return {"per_n": out, "inference_alone_load_n": inf}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a < 1 min smoke test")
    p.add_argument("--client", choices=("auto", "wrk", "raw"), default="auto")
    p.add_argument("--stores", default="redis,embedded", help="comma-separated: redis,embedded")
    p.add_argument(
        "--variants",
        default="base",
        choices=["base"],
        help="base: `mtrank serve` as shipped (the earlier `patched` experiment has landed)",
    )
    p.add_argument("--results-dir", type=Path, default=None)
    p.add_argument("--prepare-only", action="store_true", help="build the model, then stop")
    args = p.parse_args(argv_of(argv))
    s = QUICK if args.quick else FULL
    client = args.client if args.client != "auto" else ("wrk" if shutil.which("wrk") else "raw")
    started = time.perf_counter()
    json_path, _ = output_paths("serve", args)
    load_before, up_before = os.getloadavg(), uptime()

    world = prepare_world(DATA / ("serve-quick" if args.quick else "serve"), s)
    if args.prepare_only:
        print(json.dumps(world.size, indent=1))
        return 0
    namespace = f"bench-serve-{os.getpid()}"
    ns_all = sorted({n for _, _, n in scenarios(s)})
    reqs = {
        n: make_requests(world.spec, world.snap, namespace, n, BODIES_PER_N, 0, CONTEXT)
        for n in ns_all
    }
    runs: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="mtrank-bench-serve-"))
    try:
        loaded = load_redis(world.snap, namespace)
        floor = floors(world, reqs, s)
        for variant, store in itertools.product(args.variants.split(","), args.stores.split(",")):
            for workers in sorted({w for w, _, _ in scenarios(s, variant)}):
                with server(world, workers, store, namespace, variant) as url:
                    check_response(url, reqs[s.load_n][0])
                    for w, conns, n in scenarios(s, variant):
                        if w != workers:
                            continue
                        r = load_run(url, reqs[n], conns, s, tmp, client)
                        runs.append(
                            {
                                "variant": variant,
                                "store": store,
                                "workers": w,
                                "concurrency": conns,
                                "n": n,
                                **r,
                            }
                        )
                        print(
                            f"  {variant:7s} {store:8s} w={w} c={conns:2d} N={n:4d}  p50 "
                            f"{r['p50']:.2f} ms  p99 {r['p99']:.2f} ms  {r['rps']:.0f} req/s  "
                            f"err {r['errors']}",
                            flush=True,
                        )
        floor_after = floors(world, {s.load_n: reqs[s.load_n]}, s)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        deleted = drop_namespace(namespace)

    summary = summarise(runs, floor, s)
    payload = {
        "client": client,
        "model": world.size,
        "train_steps": s.train_steps,
        "impressions": s.impressions,
        "snapshot_load": {k: v for k, v in loaded.items() if k != "expired"},
        "redis_keys_deleted_after": deleted,
        "load_before": {"loadavg": [round(x, 2) for x in load_before], "uptime": up_before},
        "load_after": {"loadavg": [round(x, 2) for x in os.getloadavg()], "uptime": uptime()},
        "versions": versions(),
        "floor": floor,
        "floor_after": floor_after,
        "runs": runs,
        "summary": summary,
    }
    write_result(json_path, "serve", argv_of(argv), started, payload)
    print_tables(runs, floor, summary)
    print(f"wrote {json_path}")
    return 0


def summarise(runs: list[dict[str, Any]], floor: dict[str, Any], s: Sizes) -> dict[str, Any]:
    """Ratios service / floor at concurrency 1 and the concurrency-8 throughput target."""
    out: dict[str, Any] = {}
    inf_p50 = floor["inference_alone_load_n"]["p50"]
    target_rps = 0.7 * 2 / (inf_p50 / 1e3)
    out["throughput_target_rps"] = round(target_rps, 1)
    out["inference_p50_ms"] = inf_p50
    for r in runs:
        f = floor["per_n"][str(r["n"])][r["store"]]["sum"]
        key = run_key(r)
        entry: dict[str, Any] = {
            "p50_ratio": round(r["p50"] / f["p50"], 3),
            "p99_ratio": round(r["p99"] / f["p99"], 3),
        }
        if r["concurrency"] == 1 and r["n"] == s.load_n:
            entry["p50_target_met"] = entry["p50_ratio"] <= 1.3
            entry["p99_target_met"] = entry["p99_ratio"] <= 2.0
        if r["concurrency"] == 8:
            entry["rps_vs_target"] = round(r["rps"] / target_rps, 3)
            entry["rps_target_met"] = r["rps"] >= target_rps
        out[key] = entry
    return out


def run_key(r: dict[str, Any]) -> str:
    return f"{r['variant']}_{r['store']}_w{r['workers']}_c{r['concurrency']}_n{r['n']}"


def versions() -> dict[str, str]:
    import hiredis
    import onnxruntime
    import redis
    import uvicorn

    wrk = (
        subprocess.run(["wrk", "-v"], capture_output=True, text=True)
        if shutil.which("wrk")
        else None
    )
    return {
        "onnxruntime": onnxruntime.__version__,
        "redis_py": redis.__version__,
        "hiredis": hiredis.__version__,
        "uvicorn": uvicorn.__version__,
        "wrk": (wrk.stdout or wrk.stderr).split("\n")[0] if wrk else "missing",
    }


def print_tables(
    runs: list[dict[str, Any]], floor: dict[str, Any], summary: dict[str, Any]
) -> None:
    rows = []
    for r in runs:
        key = run_key(r)
        st = r["stages_ms"]
        rows.append(
            [
                r["variant"],
                r["store"],
                r["workers"],
                r["concurrency"],
                r["n"],
                r["p50"],
                r["p90"],
                r["p99"],
                r["max"],
                r["rps"],
                summary[key]["p50_ratio"],
                summary[key]["p99_ratio"],
                " ".join(f"{k}={v:.3g}" for k, v in st.items()),
            ]
        )
    print(
        format_table(
            [
                "variant",
                "store",
                "workers",
                "conc",
                "N",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "req/s",
                "p50/floor",
                "p99/floor",
                "stage means ms",
            ],
            rows,
        )
    )
    frows = []
    for n, per in floor["per_n"].items():
        for store, parts in per.items():
            cells = [parts.get(k) for k in ("parse", "mget", "inference", "sum")]
            frows.append(
                [n, store] + [f"{v['p50']:.3f}/{v['p99']:.3f}" if v else "-" for v in cells]
            )
    print(format_table(["N", "floor", "parse p50/p99", "mget", "inference", "sum"], frows))
    print(
        f"concurrency-8 throughput target: {summary['throughput_target_rps']} req/s "
        f"(0.7 x 2 cores / {summary['inference_p50_ms']} ms)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
