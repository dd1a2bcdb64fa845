"""What logging every request's served features costs ``/rank`` throughput, measured.

``python -m bench.served_log [--quick]``. Loopback only, bounded runs. Two ``mtrank serve``
processes on the serving benchmark's world (bench/serve.py: embedded store, one worker, one ONNX
Runtime thread each), identical except that one writes the served-feature log at
``MTRANK_SERVED_LOG_SAMPLE=1`` (service/served_log.py) into a temporary folder. Only one is
under load at a time: interleaved rounds at concurrency 8, N = 100 and N = 500, and the median
of the rounds' requests per second per setting. The log is checked afterwards (rows written
equal the candidates answered, none dropped), so the figure is for logging that kept up.
Target (issue 14): <= 10% of ``/rank`` throughput at concurrency 8.
Results: bench/results/served_log.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import orjson

from bench.common import DATA, argv_of, format_table, output_paths, write_result
from bench.serve import CONTEXT, FULL, NAME, QUICK, World, prepare_world
from harness.load import run_load
from harness.processes import ServiceProcess, metric_value


def bodies(world: World, n: int, count: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    uids = [str(u) for u in world.snap.user_ids[:count]]
    iids = [str(i) for i in world.snap.item_ids]
    out = []
    for k in range(count):
        items = rng.choice(len(iids), size=n, replace=n > len(iids))
        out.append(orjson.dumps({"user_id": uids[k % len(uids)], "size": 20, "context": CONTEXT,
                                 "candidates": [{"item_id": iids[i]} for i in items]}))  # fmt: skip
    return out


def rps(port: int, body_list: Sequence[bytes], seconds: float) -> tuple[float, int]:
    result = asyncio.run(run_load(port, lambda i: body_list[i % len(body_list)], concurrency=8,
                                  max_requests=1_000_000, duration_s=seconds))  # fmt: skip
    bad = [s for s in result.samples if s.error is not None or s.status != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} failed requests, first {bad[0]}")
    return len(result.samples) / max(result.finished - result.started, 1e-9), len(result.samples)


def rows_logged(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return {r: metric_value(text, "mtrank_served_log_rows_total", {"result": r})
            for r in ("written", "dropped")}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args(argv_of(argv))
    started = time.perf_counter()
    sizes = QUICK if args.quick else FULL
    rounds, seconds, ns = (2, 2.0, (100,)) if args.quick else (6, 8.0, (100, 500))
    world = prepare_world(DATA / ("serve-quick" if args.quick else "serve"), sizes)
    load_before = [round(x, 2) for x in os.getloadavg()]
    log_dir = Path(tempfile.mkdtemp(prefix="mtrank-served-log-"))
    base = {
        "MTRANK_MODEL_DIR": str(world.root), "MTRANK_MODEL_NAMES": NAME,
        "MTRANK_SNAPSHOT_PATH": str(world.snap_path), "MTRANK_ORT_INTRA_THREADS": "1",
        "MTRANK_RELOAD_POLL_SECONDS": "0", "MTRANK_CONFIG_POLL_SECONDS": "0",
        "MTRANK_MAX_CANDIDATES": "2000", "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    logged = {**base, "MTRANK_SERVED_LOG_DIR": str(log_dir), "MTRANK_SERVED_LOG_SAMPLE": "1"}
    results: dict[str, dict[str, object]] = {}
    try:
        with ServiceProcess(base, workers=1) as off, ServiceProcess(logged, workers=1) as on:
            for n in ns:
                body_list = bodies(world, n, 64, seed=n)
                got: dict[str, list[float]] = {"off": [], "on": []}
                for r in range(rounds):
                    for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                        svc = off if mode == "off" else on
                        rps(svc.port, body_list, min(1.0, seconds / 4))  # warm / settle
                        x, _ = rps(svc.port, body_list, seconds)
                        got[mode].append(x)
                    print(
                        f"  N={n} round {r + 1}/{rounds}: off {got['off'][-1]:.1f}, on "
                        f"{got['on'][-1]:.1f} req/s, load {os.getloadavg()[0]:.2f}",
                        flush=True,
                    )
                o, f = float(np.median(got["off"])), float(np.median(got["on"]))
                results[str(n)] = {
                    "rps_off": got["off"],
                    "rps_on": got["on"],
                    "median_off": round(o, 2),
                    "median_on": round(f, 2),
                    "cost": round(1 - f / o, 4),
                    "target_met": 1 - f / o <= 0.10,
                }
            time.sleep(6)  # a flush interval: the last rows reach the disk
            counts = rows_logged(on.base_url)
        disk = sum(p.stat().st_size for p in log_dir.rglob("*.npz"))
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    load_after = [round(x, 2) for x in os.getloadavg()]
    rows = [[n, d["median_off"], d["median_on"], f"{d['cost']:.1%}",
             "met" if d["target_met"] else "missed"] for n, d in results.items()]  # fmt: skip
    print(format_table(["N", "req/s no log", "req/s log 100%", "throughput cost", "<= 10%"],
                       rows))  # fmt: skip
    print(
        f"rows written {counts['written']:.0f}, dropped {counts['dropped']:.0f}, "
        f"{disk / 2**20:.0f} MB on disk ({disk / max(counts['written'], 1):.0f} B per row)"
    )
    print(f"load average before {load_before}, after {load_after} on {os.cpu_count()} cpus")
    json_path, _ = output_paths("served_log", args)
    write_result(json_path, "served_log", argv_of(argv), started, {
        "results": results, "rows": counts, "bytes_on_disk": disk, "concurrency": 8,
        "load_before": load_before, "load_after": load_after, "world": world.size,
    })  # fmt: skip
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
