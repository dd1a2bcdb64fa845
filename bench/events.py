"""``POST /events`` ingestion rate per worker, batches of 500, into the real Redis stream.

``python -m bench.events [--quick]``. Loopback only, bounded in requests and seconds. One
``mtrank serve`` worker on the serving benchmark's world (bench/serve.py) with the Redis feature
store, so the events go to that namespace's stream. Every batch holds 500 events with ids never
sent before (a real append each, not a duplicate), a mix of impressions, clicks, carts, collects,
purchases and stays; the bodies are built before the clock starts. Closed-loop clients at
concurrency 1, 2 and 4; the figure is accepted events per second of wall time, checked against
the stream's length afterwards. Target (issue 14): >= 20,000 events/s per worker.
Results: bench/results/events.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Sequence
from pathlib import Path

import orjson
import redis

from bench.common import DATA, argv_of, format_table, output_paths, write_result
from bench.serve import FULL, NAME, QUICK, REDIS_URL, drop_namespace, load_redis, prepare_world
from harness.load import run_load
from harness.processes import ServiceProcess
from mtrank.events import stream_key

BATCH = 500
TYPES = ("impression", "impression", "impression", "click", "click", "cart", "collect",
         "purchase", "stay")  # fmt: skip


def bodies(n_batches: int, run: str, items: Sequence[str], users: Sequence[str]) -> list[bytes]:
    now = time.time()
    out = []
    for b in range(n_batches):
        events = []
        for k in range(BATCH):
            i = b * BATCH + k
            kind = TYPES[i % len(TYPES)]
            ev = {"event_id": f"{run}-{i}", "type": kind, "request_id": f"req-{i // 20}",
                  "user_id": users[i % len(users)], "item_id": items[i % len(items)],
                  "ts": now - 60}  # fmt: skip
            if kind == "purchase":
                ev["amount"] = 10.0 + i % 90
            elif kind == "stay":
                ev["seconds"] = float(i % 300)
            events.append(ev)
        out.append(orjson.dumps({"events": events}))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args(argv_of(argv))
    started = time.perf_counter()
    sizes = QUICK if args.quick else FULL
    seconds = 3.0 if args.quick else 10.0
    work = DATA / ("events-quick" if args.quick else "events")
    world = prepare_world(work, sizes)
    namespace = f"bench-events-{os.getpid()}"
    load_before = [round(x, 2) for x in os.getloadavg()]
    conn = redis.Redis.from_url(REDIS_URL)
    rows, runs = [], []
    try:
        load_redis(world.snap, namespace)
        env = {
            "MTRANK_MODEL_DIR": str(world.root), "MTRANK_MODEL_NAMES": NAME,
            "MTRANK_REDIS_URL": REDIS_URL, "MTRANK_FEATURE_NAMESPACE": namespace,
            "MTRANK_RELOAD_POLL_SECONDS": "0", "MTRANK_CONFIG_POLL_SECONDS": "0",
            "MTRANK_MAX_BODY_BYTES": str(4 << 20), "MTRANK_EVENTS_TIMEOUT_MS": "5000",
        }  # fmt: skip
        items = [str(i) for i in world.snap.item_ids[:5000]]
        users = [str(u) for u in world.snap.user_ids[:5000]]
        per_run = int(seconds * 40_000 / BATCH) + 20  # enough for 40k events/s
        with ServiceProcess(env, workers=1) as svc:
            warm = bodies(10, "warm", items, users)
            asyncio.run(run_load(svc.port, lambda i: warm[i], concurrency=1, max_requests=10,
                                 duration_s=30, path="/events"))  # fmt: skip
            for concurrency in (1, 2, 4):
                run = f"c{concurrency}"
                batch = bodies(per_run, run, items, users)
                before = conn.xlen(stream_key(namespace))
                cpu0 = os.times()
                result = asyncio.run(run_load(
                    svc.port, lambda i, b=batch: b[i], concurrency=concurrency,
                    max_requests=len(batch), duration_s=seconds, path="/events",
                ))  # fmt: skip
                cpu1 = os.times()
                wall = result.finished - result.started
                ok = [s for s in result.samples if s.error is None and s.status == 200]
                if len(ok) != len(result.samples):
                    bad = [s for s in result.samples if s not in ok]
                    raise RuntimeError(f"{len(bad)} failed batches, first {bad[0]}")
                appended = conn.xlen(stream_key(namespace)) - before
                if appended != len(ok) * BATCH:
                    raise RuntimeError(f"{appended} entries appended for {len(ok)} batches")
                rate = appended / wall
                client_cpu = (cpu1.user - cpu0.user + cpu1.system - cpu0.system) / wall
                runs.append({"concurrency": concurrency, "batches": len(ok), "events": appended,
                             "seconds": round(wall, 3), "events_per_s": round(rate, 1),
                             "p50_ms": round(result.percentile(50) * 1e3, 3),
                             "p99_ms": round(result.percentile(99) * 1e3, 3),
                             "client_cpu_cores": round(client_cpu, 3)})  # fmt: skip
                rows.append([concurrency, len(ok), appended, round(rate), runs[-1]["p50_ms"],
                             runs[-1]["p99_ms"], runs[-1]["client_cpu_cores"]])  # fmt: skip
                print(f"  concurrency {concurrency}: {rate:,.0f} events/s", flush=True)
    finally:
        conn.delete(stream_key(namespace))
        drop_namespace(namespace)
    load_after = [round(x, 2) for x in os.getloadavg()]
    print(format_table(["clients", "batches", "events", "events/s", "p50 ms", "p99 ms",
                        "client CPU (cores)"], rows))  # fmt: skip
    best = max(r["events_per_s"] for r in runs)
    print(
        f"best {best:,.0f} events/s per worker (target >= 20,000): "
        f"{'met' if best >= 20_000 else 'missed'}; load {load_before} -> {load_after}"
    )
    json_path, _ = output_paths("events", args)
    write_result(json_path, "events", argv_of(argv), started, {
        "batch": BATCH, "workers": 1, "runs": runs, "best_events_per_s": best,
        "target_met": best >= 20_000, "load_before": load_before, "load_after": load_after,
    })  # fmt: skip
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
