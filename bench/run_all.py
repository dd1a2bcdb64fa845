"""Run every benchmark, one after another: ``python -m bench.run_all [--quick] [--only NAME]``.

Each benchmark is a module ``bench.NAME`` run as its own process (``python -m bench.NAME``), so
one benchmark's threads, memory and imports never affect the next one's numbers. Every module in
``BENCHMARKS`` must accept ``--quick`` (tiny sizes, under a minute: the smoke test) or ignore
its arguments. A module listed but not written yet is reported as missing, not as a failure.
Quality benchmarks come first and throughput ones last, so throughput is measured on a machine
that the earlier benchmarks no longer load.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time

from bench.common import REPO

BENCHMARKS = (
    "mmoe_synthetic",  # MMoE paper synthetic study
    "census",  # UCI Census-Income, MMoE paper table
    "esmm_ecommerce",  # ESMM paper table on synthetic e-commerce
    "train_start",  # early-training AUCs: output-bias initialisation and friends
    "delayed_feedback",  # DFM / ES-DFM against naive under daily retraining
    "recall_quality",  # recall models against popularity and co-occurrence
    "pretrained_embeddings",  # item2vec / two-tower initialisation on rare items
    "ltr_fusion",  # learned fusion against the formulas (NDCG@20, GMV)
    "train_throughput",  # training samples/s per model
    "serve",  # serving latency / throughput
    "ann_index",  # faiss HNSW against exact and hnswlib at 1M items
    "recommend",  # /recommend against its parts
    "experiments",  # learned fusion, assignment and shadow costs
    "events",  # POST /events ingestion rate
    "served_log",  # served-feature logging cost
    "logs_export",  # mtrank logs export of 1M rows
    "rules_bench",  # fusion + rerank micro-benchmark
    "assemble_bench",  # feature assembly micro-benchmark
    "sizing",  # memory per million items (Redis and embedded store)
)


def run(name: str, extra: list[str]) -> tuple[str, float]:
    """Run ``bench.name``; returns (status, seconds)."""
    if importlib.util.find_spec(f"bench.{name}") is None:
        return "missing", 0.0
    t0 = time.perf_counter()
    print(f"=== bench.{name} {' '.join(extra)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", f"bench.{name}", *extra], cwd=REPO, check=False)
    status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    return status, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--only", action="append", choices=BENCHMARKS, help="run only this one (repeatable)"
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: smoke-test every benchmark")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    names = [n for n in BENCHMARKS if args.only is None or n in args.only]
    extra = ["--quick"] if args.quick else []
    results = {name: run(name, extra) for name in names}
    print("\n=== summary")
    for name, (status, seconds) in results.items():
        print(f"{name:18s} {status:22s} {seconds:7.0f}s")
    failed = [n for n, (s, _) in results.items() if s.startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
