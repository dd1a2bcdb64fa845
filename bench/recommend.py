"""``POST /recommend`` at K candidates against its parts, measured in the same run.

``python -m bench.recommend [--quick] [--k 500]``. Loopback only; every load run is bounded in
requests and seconds.

The target (issue 12): p50(/recommend at K=500) <= p50(user tower) + p50(ANN query at k=500)
+ p50(/rank at N=500) + 1 ms. The ms covers what /recommend does beyond its parts: one history
read (embedded store here, so no Redis round trip), the attribute-code mapping, the recall
metrics, and the ``recall_score``/``source`` of each item in the response.

1. Prepare (reused while the settings match): the serving benchmark's world (bench/serve.py:
   synthetic logs, its MMoE exported, the feature snapshot), then on the same logs the DSSM of
   training/configs/recall_dssm.yaml at its own sizes, trained for a few steps only (latency does
   not depend on the weights), published with the index ``--index`` picks (``auto``, the
   default, builds a flat index for this catalogue's 2,500 items; ``hnsw`` forces the graph)
   and the users' histories built.
2. One ``mtrank serve`` (one uvicorn worker, one ONNX Runtime thread) on the embedded feature and
   history stores, with the default scene's ``recall.k`` set to K.
3. For users with clicks: the /recommend bodies; the /rank bodies with the K candidates the
   service's ``/recall`` returns for the same user (so /rank ranks what /recommend would); the
   user tower's feed (``RecallSpec.encode_users`` from the raw users table) and the seen-items
   filter, which the in-process parts replay with the service's own classes
   (``RecallModel``, ``RecallIndex``: one thread each) in this process.
4. Rounds, interleaved so drift in the machine's load hits every figure alike: per round, /rank
   and /recommend at concurrency 1 (one keep-alive connection, harness/load.py), the user
   tower and the filtered index query alone, and the two on an executor thread (the service runs
   them on its inference threads: the hop's cost is in /recommend, not in the target's parts).
   p50/p90/p99 over all rounds, and per endpoint the service's own stage means
   (``mtrank_request_stage_seconds``, two /metrics scrapes around each run).
Results: bench/results/recommend.json (``--quick``: a temporary folder) and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.common import DATA, argv_of, format_table, one_thread, output_paths, write_result
from bench.serve import CONTEXT, FULL, NAME, QUICK, World, prepare_world, stage_totals
from bench.serve_floor import percentiles
from harness.load import run_load
from harness.processes import ServiceProcess, http_post

RECALL = "recall"
SLACK_MS = 1.0  # the target's allowance for what /recommend does beyond its parts
SIZE = 20  # items in each response
# The DSSM of recall_dssm.yaml at its own sizes, a few steps: the serving graph, untrained.
RECALL_STEPS = 30


@dataclass(frozen=True)
class Plan:
    world: Any  # bench.serve.Sizes: the ranker's world
    k: int  # /recommend's recall.k and /rank's N
    users: int  # distinct users the bodies rotate over
    rounds: int
    per_round: int  # requests (and in-process calls) per figure and round
    round_seconds: float  # the bound of one load run


FULL_PLAN = Plan(FULL, 500, 64, 10, 60, 15.0)
QUICK_PLAN = Plan(QUICK, 100, 16, 2, 20, 5.0)


# ------------------------------------------------------------------ 1. the recall model
def prepare_recall(world: World, work: Path, data_dir: Path, quick: bool, index: str) -> Path:
    """Train, publish and build histories once per settings; returns the history file."""
    from mtrank.history import HISTORY_DIR, latest_history
    from mtrank.registry import Registry

    marker = work / "recall.json"
    settings = {"steps": RECALL_STEPS, "index": index, "data": str(data_dir), "quick": quick}
    registry = Registry(world.root)
    history_dir = registry.model_dir(RECALL) / HISTORY_DIR
    if not (marker.is_file() and json.loads(marker.read_text()) == settings):
        from bench.common import quiet
        from training.recall.config import load_recall_config
        from training.recall.history import build_history
        from training.recall.publish import publish_recall
        from training.recall.train import train

        one_thread()
        cfg = load_recall_config(
            Path(__file__).resolve().parents[1] / "training" / "configs" / "recall_dssm.yaml",
            {"data.data_dir": str(data_dir), "epochs": 1, "max_steps": RECALL_STEPS,
             "device": "cpu", "seed": 0},
        )  # fmt: skip
        with quiet():
            result = train(cfg, work / "recall_run", log=False)
        publish_recall(result.best_checkpoint, world.root, RECALL, index, promote=True)  # type: ignore[arg-type]
        hist = build_history(data_dir, max_len=50)
        hist.save(history_dir / f"{hist.version}.npz")
        marker.write_text(json.dumps(settings))
    found = latest_history(history_dir)
    assert found is not None, "history missing after prepare"
    return found


# ------------------------------------------------------------------ 3. requests and parts
@dataclass(frozen=True)
class UserCase:
    """One user's /recommend body, /rank body and the in-process parts' inputs."""

    recommend: bytes
    rank: bytes
    feed: dict[str, np.ndarray]  # the user tower's inputs (1 row)
    seen: np.ndarray  # (n,) raw ids the index query leaves out


def make_cases(
    base_url: str, model: Any, history_path: Path, data_dir: Path, plan: Plan
) -> list[UserCase]:
    """Users with clicks, their bodies and feeds; checks the service recalls K items for each
    and the same ones as the in-process parts (else the two sides would measure other work)."""
    import pyarrow.parquet as pq

    from mtrank.history import HistorySnapshot

    hist = HistorySnapshot.load(history_path)
    users = {str(r["user_id"]): r for r in pq.read_table(data_dir / "users.parquet").to_pylist()}
    lengths = np.diff(hist.offsets)
    rows = [u for u in np.flatnonzero(lengths > 0) if str(hist.user_ids[u]) in users]
    rng = np.random.default_rng(0)
    picked = rng.choice(rows, size=min(plan.users, len(rows)), replace=False)
    cases = []
    for u in picked.tolist():
        user_id = str(hist.user_ids[u])
        items = hist.items[hist.offsets[u] : hist.offsets[u + 1]]
        recall = orjson.dumps({"user_id": user_id, "k": plan.k, "context": CONTEXT})
        status, raw = http_post(f"{base_url}/recall", recall)
        answer = orjson.loads(raw)
        if status != 200 or answer["degraded"] or len(answer["items"]) != plan.k:
            raise RuntimeError(f"/recall for user {user_id}: {status} {raw[:300]!r}")
        ids = [it["item_id"] for it in answer["items"]]
        feed = model.spec.encode_users([users[user_id]], [items.tolist()])
        seen = np.unique(items)
        mine, _ = model.index.search(model.user_vectors(feed), plan.k, exclude=[seen])
        if set(mine[0].tolist()) != {int(i) for i in ids}:
            raise RuntimeError(f"user {user_id}: the in-process recall differs from /recall")
        rank = {"user_id": user_id, "candidates": [{"item_id": i} for i in ids],
                "size": SIZE, "context": CONTEXT}  # fmt: skip
        recommend = {"user_id": user_id, "size": SIZE, "context": CONTEXT}
        cases.append(UserCase(orjson.dumps(recommend), orjson.dumps(rank), feed, seen))
    return cases


def check_answers(base_url: str, case: UserCase, k: int) -> None:
    """/recommend and /rank answer in full and undegraded, or nothing real is measured."""
    for path, body in (("/recommend", case.recommend), ("/rank", case.rank)):
        status, raw = http_post(base_url + path, body)
        answer = orjson.loads(raw)
        if status != 200 or answer["degraded"] or len(answer["items"]) != SIZE:
            raise RuntimeError(f"{path}: {status} {raw[:300]!r}")
        if path == "/recommend" and {it["source"] for it in answer["items"]} != {"ann"}:
            raise RuntimeError(f"/recommend did not recall from the index: {raw[:300]!r}")


# ------------------------------------------------------------------ 4. measuring
def http_ms(port: int, path: str, bodies: Sequence[bytes], plan: Plan, offset: int) -> list[float]:
    """Latencies (ms) of one bounded load run at concurrency 1; every answer must be a 200."""
    result = asyncio.run(
        run_load(
            port,
            lambda i: bodies[(offset + i) % len(bodies)],
            concurrency=1,
            max_requests=plan.per_round,
            duration_s=plan.round_seconds,
            path=path,
        )
    )
    bad = [s for s in result.samples if s.error is not None or s.status != 200]
    if bad:
        raise RuntimeError(f"{path}: {len(bad)} failed requests, first {bad[0]}")
    return [s.latency * 1e3 for s in result.samples]


EVICT = np.zeros((32 << 20) // 8)  # written before a "cold" part: what the ranker's inference does


def parts_ms(
    model: Any, cases: Sequence[UserCase], k: int, n: int, offset: int, pool: ThreadPoolExecutor
) -> np.ndarray:
    """(n, 5) ms per call: the user tower (session.run), the filtered index query, both again
    on an executor thread as the service runs them (the hop there and back included), and the
    tower and the query each right after writing 32 MB ("cold": in a /recommend request the
    ranker's inference over K candidates runs between two users' recalls and evicts the
    tower's weights and the index from the core's caches)."""
    out = np.zeros((n, 5))
    perf = time.perf_counter

    def both(case: UserCase) -> None:
        model.index.search(model.user_vectors(case.feed), k, exclude=[case.seen])

    for i in range(n):  # warm: back to back, nothing evicts between calls
        case = cases[(offset + i) % len(cases)]
        t0 = perf()
        vectors = model.user_vectors(case.feed)  # (1, D)
        t1 = perf()
        model.index.search(vectors, k, exclude=[case.seen])
        t2 = perf()
        pool.submit(both, case).result()
        t3 = perf()
        out[i, :3] = (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3
    for i in range(n):  # cold: each part right after the eviction
        case = cases[(offset + i) % len(cases)]
        EVICT.fill(i)
        t0 = perf()
        vectors = model.user_vectors(case.feed)
        t1 = perf()
        EVICT.fill(i)
        t2 = perf()
        model.index.search(vectors, k, exclude=[case.seen])
        t3 = perf()
        out[i, 3:] = (t1 - t0) * 1e3, (t3 - t2) * 1e3
    return out


def add_stages(acc: dict[str, list[float]], before: dict[str, list[float]],
               after: dict[str, list[float]]) -> None:  # fmt: skip
    """Add one run's per-stage [seconds, count] (two /metrics scrapes) to ``acc``."""
    for stage, (s1, c1) in after.items():
        s0, c0 = before.get(stage, [0.0, 0.0])
        total = acc.setdefault(stage, [0.0, 0.0])
        total[0] += s1 - s0
        total[1] += c1 - c0


def measure(url: str, port: int, model: Any, cases: Sequence[UserCase], plan: Plan) -> Any:
    recommend = [c.recommend for c in cases]
    rank = [c.rank for c in cases]
    pool = ThreadPoolExecutor(1, thread_name_prefix="bench-recall")
    # Warm-up: the first requests pay for lazily built state (sessions, caches, allocations).
    http_ms(port, "/recommend", recommend, plan, 0)
    http_ms(port, "/rank", rank, plan, 0)
    parts_ms(model, cases, plan.k, plan.per_round, 0, pool)
    ms: dict[str, list[float]] = {"recommend": [], "rank": [], "tower": [], "ann": [], "hop": [],
                                  "tower_cold": [], "ann_cold": []}  # fmt: skip
    stages: dict[str, dict[str, list[float]]] = {"recommend": {}, "rank": {}}
    for r in range(plan.rounds):
        offset = r * plan.per_round
        order = ["recommend", "rank", "parts"] if r % 2 == 0 else ["parts", "rank", "recommend"]
        for what in order:
            if what == "parts":
                p = parts_ms(model, cases, plan.k, plan.per_round, offset, pool)
                ms["tower"] += p[:, 0].tolist()
                ms["ann"] += p[:, 1].tolist()
                ms["hop"] += p[:, 2].tolist()
                ms["tower_cold"] += p[:, 3].tolist()
                ms["ann_cold"] += p[:, 4].tolist()
            else:
                bodies = recommend if what == "recommend" else rank
                before = stage_totals(url)
                ms[what] += http_ms(port, f"/{what}", bodies, plan, offset)
                add_stages(stages[what], before, stage_totals(url))
        print(f"  round {r + 1}/{plan.rounds}: load {os.getloadavg()[0]:.2f}", flush=True)
    pool.shutdown()
    degraded = {st: n for acc in stages.values() for st, (_, n) in acc.items()
                if st.startswith("degraded:") and n > 0}  # fmt: skip
    if degraded:  # answered from defaults or popularity: not the path the target is about
        raise RuntimeError(f"degraded responses while measuring: {degraded}")
    means = {
        path: {st: round(t / n * 1e3, 4) for st, (t, n) in acc.items()
               if n > 0 and not st.startswith("degraded:")}
        for path, acc in stages.items()
    }  # fmt: skip
    return {name: percentiles(v) for name, v in ms.items()}, means


# ------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, K=100: a smoke test")
    p.add_argument("--results-dir", type=Path, default=None)
    p.add_argument(
        "--index",
        choices=["auto", "flat", "hnsw"],
        default="auto",
        help="the recall index publish-recall builds (auto: flat at this catalogue)",
    )
    args = p.parse_args(argv_of(argv))
    started = time.perf_counter()
    load_before = [round(x, 2) for x in os.getloadavg()]
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    work = DATA / ("recommend-quick" if args.quick else "recommend")
    print(f"preparing the world in {work} (load {load_before}) ...", flush=True)
    world = prepare_world(work, plan.world)
    data_dir = work / "data"
    history = prepare_recall(world, work, data_dir, args.quick, args.index)

    from mtrank.registry import Registry
    from service.recall.runtime import RecallModel
    from service.settings import DEFAULT_RANKING_CONFIG

    ranking = work / "ranking.yaml"
    text = DEFAULT_RANKING_CONFIG.read_text()
    assert text.count("\n  default:\n") == 1, "the default scene moved in ranking.yaml"
    scene = f"\n  default:\n    recall: {{k: {plan.k}}}\n"
    ranking.write_text(text.replace("\n  default:\n", scene))
    model = RecallModel.load(Registry(world.root).resolve(RECALL), intra_op_threads=1)
    env = {
        "MTRANK_MODEL_DIR": str(world.root),
        "MTRANK_MODEL_NAMES": NAME,
        "MTRANK_SNAPSHOT_PATH": str(world.snap_path),
        "MTRANK_RANKING_CONFIG": str(ranking),
        "MTRANK_RECALL_MODEL": RECALL,
        "MTRANK_HISTORY_PATH": str(history),
        "MTRANK_ORT_INTRA_THREADS": "1",
        "MTRANK_RELOAD_POLL_SECONDS": "0",
        "MTRANK_CONFIG_POLL_SECONDS": "0",
        "OMP_NUM_THREADS": "1",
    }
    with ServiceProcess(env, workers=1) as service:
        cases = make_cases(service.base_url, model, history, data_dir, plan)
        check_answers(service.base_url, cases[0], plan.k)
        print(f"measuring {plan.rounds} rounds x {plan.per_round} per figure, K = N = {plan.k}")
        figures, stages = measure(service.base_url, service.port, model, cases, plan)

    p50 = {name: f["p50"] for name, f in figures.items()}
    parts = p50["tower"] + p50["ann"] + p50["rank"]
    parts_cold = p50["tower_cold"] + p50["ann_cold"] + p50["rank"]
    budget = parts + SLACK_MS
    load_after = [round(x, 2) for x in os.getloadavg()]
    labels = {
        "tower": "user tower (session.run, in process)",
        "ann": f"ANN query, k = {plan.k}, seen filtered (in process)",
        "hop": "tower + ANN on an executor thread (in process)",
        "rank": f"POST /rank, N = {plan.k} (HTTP)",
        "recommend": f"POST /recommend, K = {plan.k} (HTTP)",
        "tower_cold": "user tower, cold caches (in process)",
        "ann_cold": "ANN query, cold caches (in process)",
    }
    rows = [[labels[n], figures[n]["p50"], figures[n]["p90"], figures[n]["p99"], figures[n]["n"]]
            for n in ("tower", "ann", "hop", "tower_cold", "ann_cold", "rank", "recommend")
            ]  # fmt: skip
    rows.append(["tower + ANN + /rank (p50s)", round(parts, 4), "", "", ""])
    rows.append(["cold tower + cold ANN + /rank (p50s)", round(parts_cold, 4), "", "", ""])
    print(format_table(["ms", "p50", "p90", "p99", "n"], rows))
    verdict = "met" if p50["recommend"] <= budget else "missed"
    print(
        f"p50(/recommend) {p50['recommend']:.3f} ms vs parts {parts:.3f} ms: ratio "
        f"{p50['recommend'] / parts:.3f}; budget (parts + {SLACK_MS:g} ms) {budget:.3f} ms: "
        f"{verdict}"
    )
    names = sorted(set(stages["recommend"]) | set(stages["rank"]))
    print("the service's own stage means (mtrank_request_stage_seconds), ms:")
    print(format_table(["stage", "/rank", "/recommend"],
                       [[n, stages["rank"].get(n, ""), stages["recommend"].get(n, "")]
                        for n in names]))  # fmt: skip
    print(f"p50(/recommend) against the cold parts: ratio {p50['recommend'] / parts_cold:.3f}")
    print(f"load average before {load_before}, after {load_after} on {os.cpu_count()} cpus")
    if max(load_before[0], load_after[0]) > (os.cpu_count() or 1):
        print("  the load average exceeds the cpus: every figure is inflated by waiting for a core")
    json_path, _ = output_paths(
        "recommend" if args.index == "auto" else f"recommend_{args.index}", args
    )
    write_result(
        json_path, "recommend", argv_of(argv), started,
        {
            "k": plan.k, "size": SIZE, "users": len(cases), "rounds": plan.rounds,
            "per_round": plan.per_round, "workers": 1, "store": "embedded",
            "index": model.index.metadata.params.kind, "index_choice": args.index,
            "catalogue_items": int(model.index.count), "ms": figures,
            "parts_p50_ms": round(parts, 4), "parts_cold_p50_ms": round(parts_cold, 4),
            "budget_ms": round(budget, 4),
            "ratio": round(p50["recommend"] / parts, 4), "target_met": verdict == "met",
            "service_stage_means_ms": stages, "load_before": load_before,
            "load_after": load_after, "world": world.size,
        },
    )  # fmt: skip
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
