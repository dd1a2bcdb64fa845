"""``mtrank logs export`` of 1M served rows, timed. Target (issue 14): < 60 s on this machine.

``python -m bench.logs_export [--quick] [--rows N]``. The served rows are written by the service's
own writer (service/served_log.py ``ServedLog``): requests of 500 candidates, the top 100 returned,
spread over one day, with a spec of 10 sparse inputs (user and item vocabularies of 50k and 100k)
and 4 dense ones, and 5 task outputs, in segments of at most 100k rows as the service cuts them.
The events are those a client would send for them: an impression for every returned item, a
click on 10% of those, a cart, a collect, a stay and a purchase on parts of the clicks (a tenth
of the events re-sent under the same event_id, as a retry after the dedup window stores them), plus
as many events of requests outside the range. They are written as the archiver writes them
(``write_parts``, 10k entries a part), so the export reads them as it reads a real archive.

The clock runs around ``training.logs.export`` only (reading the segments and the archive, the
join, the labels, the Parquet, the spec and the dataset YAML), after a warm-up export on a small
slice so imports and first-call costs are not counted. The export's own figures per stage are
reported, and its labels are checked against the generated counts (a wrong join would not be
fast by accident). With a reachable Redis (``--redis``), the archiver is timed too: a stream of
``--archive-events`` entries (quick: a tenth) read through a consumer group into parts.
Results: bench/results/logs_export.json (``--quick``: the quick results folder).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import redis
from redis.exceptions import RedisError

from bench.common import DATA, argv_of, format_table, output_paths, write_result
from mtrank.events import ENTRY_FIELD, stream_key
from mtrank.registry import METADATA_FILE
from mtrank.spec import DenseField, FeatureSpec, SparseField, TaskOutput
from service.metrics import Metrics
from service.served_log import ServedLog, ServedRequest, spec_meta
from training.events_archive import Archiver, entries_to_table, write_parts
from training.logs import EventSources, export

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z: the served range is that day
DAY = 86_400.0
CANDIDATES, RETURNED = 500, 100
TASKS = ["ctr", "cvr", "cart", "collect", "stay"]
REDIS_URL = os.environ.get("MTRANK_BENCH_REDIS", "redis://127.0.0.1:6379/0")


def bench_spec() -> FeatureSpec:
    """10 sparse inputs (the vocabularies of a mid-sized shop), 4 dense, 5 outputs."""
    sizes = {"user_id": 50_000, "age_bucket": 8, "city_tier": 4, "gender": 3,
             "item_id": 100_000, "category": 200, "brand": 2_000, "promoted": 2, "hour": 24,
             "device": 3}  # fmt: skip
    sources = {"user_id": "user", "age_bucket": "user", "city_tier": "user", "gender": "user",
               "hour": "context", "device": "context"}  # fmt: skip
    vocab = {n: [f"{n}{k}" for k in range(v)] for n, v in sizes.items()}
    sparse = [SparseField(name=n, source=sources.get(n, "item"), vocab=v) for n, v in vocab.items()]
    dense = [DenseField(name=n, source=s, mean=1.0, std=2.0, default=1.0)
             for n, s in (("user_activity", "user"), ("past_purchases", "user"),
                          ("price", "item"), ("quality", "item"))]  # fmt: skip
    kinds = {"stay": "regression"}
    outputs = [TaskOutput(name=t, kind=kinds.get(t, "binary")) for t in TASKS]
    return FeatureSpec(sparse=sparse, dense=dense, outputs=outputs)


def write_served(directory: Path, spec: FeatureSpec, n_requests: int, seed: int) -> int:
    """``n_requests`` requests through the service's writer; returns the rows written."""
    rng = np.random.default_rng(seed)
    meta = spec_meta(spec, TASKS)
    high = np.array([f.vocab_size for f in spec.sparse])
    log = ServedLog(directory, 1.0, Metrics(), flush_s=3600, max_rows=100_000,
                    max_backlog_rows=10_000_000)  # fmt: skip
    for r in range(n_requests):
        item_idx = rng.choice(100_000, CANDIDATES, replace=False) + 1  # unique, as /rank asks
        sparse = rng.integers(0, high, size=(CANDIDATES, len(high)))  # (N, S)
        sparse[:, 4] = item_idx
        outputs = {t: rng.random(CANDIDATES).astype(np.float32) for t in TASKS}
        score = rng.random(CANDIDATES)
        log.record(ServedRequest(
            f"{r:032x}", T0 + r * DAY / n_requests, f"user_id{r % 50_000}",
            [f"item_id{i - 1}" for i in item_idx], "default", "", "bench@v1", "snap-1", True,
            sparse, rng.normal(size=(CANDIDATES, 4)).astype(np.float32), score, outputs,
            np.argsort(-score)[:RETURNED], meta,
        ))  # fmt: skip
    log.close()
    return n_requests * CANDIDATES


def make_events(served: Path, seed: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Events for the returned rows of the segments, and the labels they must make."""
    from mtrank.served_log import read_segment

    rng = np.random.default_rng(seed)
    events: list[dict[str, Any]] = []
    expected = {"impression": 0, "click": 0, "purchase": 0}

    def add(kind: str, rid: str, item: str, ts: float, **extra: Any) -> None:
        events.append({"event_id": f"e{len(events)}", "type": kind, "request_id": rid,
                       "user_id": "u", "item_id": item, "ts": ts, "received": ts + 2,
                       "orphan": False, **extra})  # fmt: skip

    for path in sorted(served.glob("*/*.npz")):
        _, a = read_segment(path)
        shown = np.flatnonzero(a["position"] >= 0)
        for k in shown:
            rid, item, ts = str(a["request_id"][k]), str(a["item_id"][k]), float(a["ts"][k])
            add("impression", rid, item, ts + 1)
            expected["impression"] += 1
            if rng.random() < 0.1:
                add("click", rid, item, ts + 5)
                expected["click"] += 1
                u = rng.random()
                if u < 0.3:
                    add("cart", rid, item, ts + 60)
                if u < 0.2:
                    add("collect", rid, item, ts + 70)
                if u < 0.5:
                    add("stay", rid, item, ts + 30, seconds=float(rng.integers(1, 300)))
                if u < 0.1:
                    add("purchase", rid, item, ts + rng.uniform(600, 5 * DAY), amount=19.9)
                    expected["purchase"] += 1
    retried = [dict(e) for e in events[::10]]  # the same event_id, stored again later
    for e in retried:
        e["received"] += 7_200
    noise = [{**e, "event_id": f"n{k}", "request_id": f"x{k:031x}"}
             for k, e in enumerate(events[: len(events) - len(retried)])]  # fmt: skip
    return events + retried + noise, expected


def write_archive(directory: Path, events: list[dict[str, Any]]) -> int:
    """The events as the archiver writes them: parts of 10k entries in arrival order."""
    events = sorted(events, key=lambda e: e["received"])
    parts = 0
    for s in range(0, len(events), 10_000):
        chunk = events[s : s + 10_000]
        entries = [(f"{int(e['received'] * 1000)}-{s + k}".encode(),
                    {ENTRY_FIELD: json.dumps(e, separators=(",", ":")).encode()})
                   for k, e in enumerate(chunk)]  # fmt: skip
        parts += len(write_parts(entries_to_table(entries), directory, "bench"))
    return parts


def publish(registry: Path, spec: FeatureSpec) -> None:
    folder = registry / "bench" / "v1"
    folder.mkdir(parents=True)
    spec.save(folder)
    tasks = [{"name": "ctr", "label": "click"},
             {"name": "cvr", "label": "purchase", "depends_on": "ctr"}]  # fmt: skip
    config = {"dataset": {"tasks": tasks, "funnel_policy": "error"}}
    (folder / METADATA_FILE).write_text(json.dumps({"training_config": config}))


def time_archiver(n_events: int, work: Path) -> dict[str, Any] | None:
    """Entries/s of ``Archiver.run(once=True)`` over a stream of ``n_events`` (None: no Redis)."""
    conn = redis.Redis.from_url(REDIS_URL)
    ns = f"bench-archive-{os.getpid()}"
    try:
        conn.ping()
    except RedisError:
        return None
    try:
        entry = {ENTRY_FIELD: json.dumps({"event_id": "x", "type": "click", "request_id": "r" * 32,
                                          "user_id": "u1", "item_id": "i1", "ts": time.time(),
                                          "received": time.time(), "orphan": False})}  # fmt: skip
        pipe = conn.pipeline(transaction=False)
        for k in range(n_events):
            pipe.xadd(stream_key(ns), entry)
            if k % 5_000 == 4_999:
                pipe.execute()
        pipe.execute()
        t = time.perf_counter()
        stats = Archiver(conn, ns, "bench", work / "archived", "bench").run(once=True)
        seconds = time.perf_counter() - t
        if stats.written != n_events:
            raise RuntimeError(f"archived {stats.written} of {n_events} entries")
        return {"events": n_events, "seconds": round(seconds, 3), "parts": stats.parts,
                "events_per_s": round(n_events / seconds, 1)}  # fmt: skip
    finally:
        for key in conn.scan_iter(match=f"mtrank:{ns}:*"):
            conn.delete(key)
        conn.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="50k rows")
    p.add_argument("--rows", type=int, default=None, help="served rows (default 1M)")
    p.add_argument("--archive-events", type=int, default=200_000)
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args(argv_of(argv))
    started = time.perf_counter()
    rows = args.rows or (50_000 if args.quick else 1_000_000)
    n_requests = max(rows // CANDIDATES, 2)
    work = DATA / ("logs-export-quick" if args.quick else "logs-export")
    shutil.rmtree(work, ignore_errors=True)
    spec = bench_spec()
    publish(work / "models", spec)
    t = time.perf_counter()
    written = write_served(work / "served", spec, n_requests, seed=0)
    events, expected = make_events(work / "served", seed=1)
    parts = write_archive(work / "archive", events)
    generate_s = time.perf_counter() - t
    print(f"generated {written:,} served rows, {len(events):,} events in {parts} parts "
          f"({generate_s:.0f} s)", flush=True)  # fmt: skip
    sources = EventSources(archive=work / "archive")
    export(work / "served", T0, T0 + DAY / n_requests * 2, work / "warm", sources,
           as_of=T0 + 30 * DAY, registry=work / "models")  # fmt: skip
    load_before = [round(x, 2) for x in os.getloadavg()]
    t = time.perf_counter()
    report = export(work / "served", T0, T0 + DAY, work / "out", sources, as_of=T0 + 30 * DAY,
                    registry=work / "models")  # fmt: skip
    seconds = time.perf_counter() - t
    load_after = [round(x, 2) for x in os.getloadavg()]
    got = {k: report.positives[k] for k in expected}
    if report.served_rows != written or got != expected:
        raise RuntimeError(f"export read {report.served_rows} rows, labels {got} != {expected}")
    out_mb = sum(f.stat().st_size for f in (work / "out").iterdir()) / 2**20
    archiver = time_archiver(args.archive_events // (10 if args.quick else 1), work)
    print(format_table(
        ["served rows", "rows written", "events read", "matched", "seconds", "rows/s",
         "served s", "events s", "join s", "write s"],
        [[written, report.rows_written, report.events_read, report.events_matched,
          round(seconds, 2), round(written / seconds), *report.stage_seconds.values()]],
    ))  # fmt: skip
    target = 60.0 * written / 1_000_000
    met = seconds < target
    print(f"export of {written:,} rows in {seconds:.1f} s (target < {target:.0f} s): "
          f"{'met' if met else 'missed'}; load {load_before} -> {load_after}")  # fmt: skip
    if archiver is not None:
        print(f"archiver: {archiver['events']:,} entries in {archiver['seconds']} s "
              f"({archiver['events_per_s']:,.0f}/s, {archiver['parts']} parts)")  # fmt: skip
    json_path, _ = output_paths("logs_export", args)
    write_result(json_path, "logs_export", argv_of(argv), started, {
        "served_rows": written, "requests": n_requests, "candidates": CANDIDATES,
        "returned": RETURNED, "sparse_inputs": len(spec.sparse), "dense_inputs": len(spec.dense),
        "tasks": len(TASKS), "events": len(events), "archive_parts": parts,
        "generate_seconds": round(generate_s, 1), "export_seconds": round(seconds, 3),
        "rows_per_s": round(written / seconds, 1), "stage_seconds": report.stage_seconds,
        "rows_written": report.rows_written, "events_read": report.events_read,
        "events_matched": report.events_matched, "positives": report.positives,
        "export_mib": round(out_mb, 1), "target_seconds": target, "target_met": met,
        "archiver": archiver, "load_before": load_before, "load_after": load_after,
    })  # fmt: skip
    print(f"wrote {json_path}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
