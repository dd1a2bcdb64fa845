"""Memory soak: does a worker's resident memory grow under steady load?

Trains a tiny MMoE with the real pipeline (harness/trained.py), starts the reliability stack on
it (harness/stack.py: a private redis-server with the snapshot, ``mtrank serve --workers 2`` on
free loopback ports), warms it up, then runs a closed-loop load for
``--seconds`` (default 120) while sampling every worker's RSS (``/proc/PID/status`` VmRSS).
Prints RSS per worker over time, the growth from the first to the last sample after warm-up and
a least-squares slope; exits 1 when any worker grew by more than ``--max-growth-mib``.

A leak per request shows as a steady slope; allocator arenas and ONNX Runtime's first
allocations settle during warm-up, which is why it is excluded. Not part of the test suite
(it takes ~2.5 minutes): ``.venv/bin/python -m bench.soak``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from harness.load import LoadThread
from harness.processes import rss_kib
from harness.stack import StackFactory, build_model_source, cycle, rank_bodies
from harness.trained import build_trained_world


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=120.0, help="soak duration after warm-up")
    p.add_argument("--warmup", type=float, default=20.0, help="load before the first sample")
    p.add_argument("--every", type=float, default=10.0, help="seconds between RSS samples")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-growth-mib", type=float, default=16.0, help="fail above this growth")
    p.add_argument("--json", type=Path, help="also write the samples and verdict here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="mtrank-soak-"))
    print("training a tiny model with the real pipeline ...", flush=True)
    world = build_trained_world(tmp / "world")
    factory = StackFactory(tmp, build_model_source(tmp / "registry", world), [])
    try:
        stack = factory()
        pids = stack.service.worker_pids()
        bodies = cycle(rank_bodies(n=256, candidates=50, size=10, seed=41))
        total = args.warmup + args.seconds + 5.0
        load = LoadThread(
            stack.service.port, bodies, concurrency=args.concurrency, duration_s=total,
            max_requests=10_000_000,
        )  # fmt: skip
        with load:
            time.sleep(args.warmup)
            start = time.monotonic()
            times: list[float] = []
            rows: list[list[int]] = []
            print(f"{'t (s)':>7} " + " ".join(f"{'pid ' + str(p):>14}" for p in pids))
            while True:
                t = time.monotonic() - start
                now = [rss_kib(p) for p in pids]
                times.append(t)
                rows.append(now)
                print(f"{t:7.1f} " + " ".join(f"{r / 1024:11.1f} MiB" for r in now), flush=True)
                if t >= args.seconds:
                    break
                time.sleep(min(args.every, max(0.0, args.seconds - t)))
            load.stop()
        result = load.result()
    finally:
        factory.close()
    rss = np.asarray(rows, dtype=np.float64)  # (T, W) KiB
    return report(args, pids, np.asarray(times), rss, result.summary())


def report(
    args: argparse.Namespace, pids: list[int], times: np.ndarray, rss: np.ndarray, load: str
) -> int:
    """Growth and slope per worker; rss is (T, W) KiB over sample times (T,)."""
    growth_mib = (rss[-1] - rss[0]) / 1024.0  # (W,)
    slopes = [float(np.polyfit(times, rss[:, w] / 1024.0, 1)[0]) * 60 for w in range(len(pids))]
    print(f"load: {load}")
    worst = float(growth_mib.max())
    for w, pid in enumerate(pids):
        print(
            f"worker {pid}: {rss[0, w] / 1024:.1f} -> {rss[-1, w] / 1024:.1f} MiB, "
            f"growth {growth_mib[w]:+.1f} MiB ({100 * growth_mib[w] * 1024 / rss[0, w]:+.1f}%), "
            f"slope {slopes[w]:+.2f} MiB/min"
        )
    ok = worst <= args.max_growth_mib
    print(f"verdict: {'OK' if ok else 'GROWTH'} (max growth {worst:+.1f} MiB, "
          f"limit {args.max_growth_mib} MiB over {times[-1]:.0f} s)")  # fmt: skip
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "seconds": times.tolist(), "rss_kib": rss.tolist(), "pids": pids,
                    "growth_mib": growth_mib.tolist(), "slope_mib_per_min": slopes,
                    "load": load, "ok": ok,
                },
                indent=1,
            )
        )  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
