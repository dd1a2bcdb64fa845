"""What learned fusion, experiment assignment and shadow models cost a serving request, measured.

``python -m bench.experiments [--quick]``. Loopback only; every load run is bounded in requests
and seconds. Three figures against their targets (issue 13):

1. **LTR fusion at N = 500** adds <= 1 ms to ``/rank`` p50 against the formula, in the same run:
   one service, two scenes with the same rules, ``formula`` (the shipped default formula) and
   ``learned`` (``fusion: {type: model}``: a LambdaMART trained by ``train_ltr`` on the world's
   logs over the served MMoE's outputs, training/configs/ltr_lambdamart.yaml's sizes), requests
   alternating between the two in interleaved rounds at concurrency 1.
2. **Experiment assignment** <= 10 us per request: :meth:`service.variants.Plan.variant` for a
   scene in two experiments of two layers (two hashes and two bisects), timed in process over
   200,000 calls on distinct user ids; and the X-Mtrank-Arm header's parse.
3. **Shadow scoring at 100%** costs <= 15% of ``/rank`` throughput at concurrency 8: the same
   service with and without a shadow (the served MMoE version again, so the shadow does the live
   request's inference a second time), switched by ``POST /admin/reload`` between interleaved
   rounds, at N = 100 and N = 500. The shadow runs at nice 19 with a bounded number in flight
   (service/shadow.py): under saturation it yields and skips, so the figure to read with the
   throughput is the share of requests whose shadow completed.

The world is bench/serve.py's (synthetic logs, an MMoE, the snapshot, the embedded store; one
uvicorn worker, one ONNX Runtime thread). Results: bench/results/experiments.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import yaml

from bench.common import DATA, argv_of, format_table, output_paths, write_result
from bench.serve import CONTEXT, FULL, NAME, QUICK, World, prepare_world, stage_totals
from bench.serve_floor import percentiles
from harness.load import run_load
from harness.processes import ServiceProcess, http_post, metric_value

LTR = "fusion"
TOKEN = "bench-admin-token-0123456789"
SIZE = 20


@dataclass(frozen=True)
class Plan:
    world: Any
    users: int
    rounds: int  # interleaved rounds per comparison
    per_round: int  # /rank requests per figure and round (concurrency 1)
    tput_seconds: float  # one throughput run
    assign_calls: int
    ns: tuple[int, ...]  # candidate counts of the shadow comparison


FULL_PLAN = Plan(FULL, 64, 8, 60, 6.0, 200_000, (100, 500))  # ns[-1]: the LTR comparison's N
QUICK_PLAN = Plan(QUICK, 16, 2, 20, 2.0, 20_000, (100,))


# ------------------------------------------------------------------ preparation
def prepare_ltr(world: World, work: Path, quick: bool) -> None:
    """A LambdaMART over the served MMoE's outputs, published and promoted as ``fusion``."""
    from mtrank.registry import Registry
    from training.config import load_dataset_spec
    from training.ltr.config import load_ltr_config
    from training.ltr.train import train_ltr

    marker = work / "ltr.json"
    settings = {"model": world.model_path.parent.name, "quick": quick}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        if Registry(world.root).current(LTR) is not None:
            return
    repo = Path(__file__).resolve().parents[1]
    configs = repo / "training" / "configs"
    data_dir = work / "data"
    ds = load_dataset_spec(configs / "ecommerce.dataset.yaml")
    ds = ds.model_copy(update={"train": str(data_dir / "train.parquet"),
                               "valid": str(data_dir / "valid.parquet"), "test": None})  # fmt: skip
    ds_path = work / "ltr_dataset.yaml"
    ds_path.write_text(yaml.safe_dump(ds.model_dump(mode="json"), sort_keys=False))
    cfg = load_ltr_config(configs / "ltr_lambdamart.yaml")
    cfg = cfg.model_copy(update={
        "name": LTR, "root": str(world.root), "promote": True, "ranker": NAME,
        "dataset": str(ds_path), "cache_dir": str(work / "cache"),
    })  # fmt: skip
    train_ltr(cfg, Path("/"))
    marker.write_text(json.dumps(settings))


def ranking_configs(work: Path) -> tuple[Path, str, str]:
    """(path, text without shadow, text with a 100% shadow): scenes ``formula`` and ``learned``
    share the default scene's rules; only the fusion differs."""
    from service.settings import DEFAULT_RANKING_CONFIG

    doc = yaml.safe_load(DEFAULT_RANKING_CONFIG.read_text())
    default = doc["scenes"]["default"]
    doc["scenes"]["formula"] = {"fusion": default["fusion"], "rules": default["rules"]}
    doc["scenes"]["learned"] = {"fusion": {"type": "model", "model": LTR},
                                "rules": default["rules"]}  # fmt: skip
    plain = yaml.safe_dump(doc, sort_keys=False)
    doc["shadows"] = [{"name": "self", "models": [NAME], "sample_bp": 10_000, "top_k": 20,
                       "timeout_ms": 1000, "log_sample_bp": 0}]  # fmt: skip
    shadowed = yaml.safe_dump(doc, sort_keys=False)
    path = work / "ranking-experiments.yaml"
    path.write_text(plain)
    return path, plain, shadowed


def bodies(world: World, n: int, users: int, scene: str, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    uids = [str(u) for u in world.snap.user_ids[: max(users, 1)]]
    iids = [str(i) for i in world.snap.item_ids]
    out = []
    for k in range(users):
        items = rng.choice(len(iids), size=n, replace=n > len(iids))  # quick world: few items
        out.append(orjson.dumps({
            "user_id": uids[k % len(uids)], "candidates": [{"item_id": iids[i]} for i in items],
            "size": SIZE, "scene": scene, "context": CONTEXT,
        }))  # fmt: skip
    return out


# ------------------------------------------------------------------ measuring
def latency_ms(port: int, body_list: Sequence[bytes], n: int, offset: int) -> list[float]:
    result = asyncio.run(run_load(port, lambda i: body_list[(offset + i) % len(body_list)],
                                  concurrency=1, max_requests=n, duration_s=30.0))  # fmt: skip
    bad = [s for s in result.samples if s.error is not None or s.status != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} failed requests, first {bad[0]}")
    return [s.latency * 1e3 for s in result.samples]


def throughput(port: int, body_list: Sequence[bytes], seconds: float) -> float:
    result = asyncio.run(run_load(port, lambda i: body_list[i % len(body_list)], concurrency=8,
                                  max_requests=1_000_000, duration_s=seconds))  # fmt: skip
    bad = [s for s in result.samples if s.error is not None or s.status != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} failed requests under load, first {bad[0]}")
    return len(result.samples) / max(result.finished - result.started, 1e-9)


def reload(url: str, path: Path, text: str) -> None:
    path.write_text(text)
    status, raw = http_post(f"{url}/admin/reload", b"",
                            headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
    if status != 200:
        raise RuntimeError(f"reload: {status} {raw[:300]!r}")


def shadow_counts(url: str) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return {r: metric_value(text, "mtrank_shadow_runs_total", {"result": r})
            for r in ("ok", "error", "timeout", "busy")}  # fmt: skip


def fusion_overhead(url: str, port: int, world: World, plan: Plan) -> dict[str, Any]:
    ms: dict[str, list[float]] = {"formula": [], "learned": []}
    stages: dict[str, dict[str, float]] = {"formula": {}, "learned": {}}
    sets = {s: bodies(world, plan.ns[-1], plan.users, s, seed=1) for s in ms}
    for s in ms:  # warm-up
        latency_ms(port, sets[s], plan.per_round, 0)
    for r in range(plan.rounds):
        for s in ("formula", "learned") if r % 2 == 0 else ("learned", "formula"):
            before = stage_totals(url)
            ms[s] += latency_ms(port, sets[s], plan.per_round, r * plan.per_round)
            after = stage_totals(url)
            for st, (t1, c1) in after.items():
                t0, c0 = before.get(st, [0.0, 0.0])
                acc = stages[s].setdefault(st, 0.0)
                stages[s][st] = acc + (t1 - t0)
                stages[s][st + ":n"] = stages[s].get(st + ":n", 0.0) + (c1 - c0)
    figures = {s: percentiles(v) for s, v in ms.items()}
    means = {s: {st: round(v / acc[st + ":n"] * 1e3, 4) for st, v in acc.items()
                 if not st.endswith(":n") and acc.get(st + ":n")}
             for s, acc in stages.items()}  # fmt: skip
    added = figures["learned"]["p50"] - figures["formula"]["p50"]
    return {"ms": figures, "stage_means_ms": means, "added_p50_ms": round(added, 4),
            "target_met": added <= 1.0}  # fmt: skip


def assignment_cost(world: World, plan: Plan, work: Path) -> dict[str, Any]:
    """Plan.variant for a scene in two experiments of two layers, in process."""
    from mtrank.registry import Registry
    from service.experiments import parse_arm_header
    from service.ranking_config import load_ranking_config
    from service.runtime import ModelBundle, ModelRuntime
    from service.serving_state import request_fields
    from service.variants import VersionCache, compile_plan

    registry = Registry(world.root)
    runtime = ModelRuntime.load(registry.resolve(NAME), providers="cpu", warmup_sizes=(1,))
    bundle = ModelBundle((runtime,))
    path, plain, _ = ranking_configs(work)
    doc = yaml.safe_load(plain)
    doc["experiments"] = [
        {"name": "fusion_ab", "layer": "fusion", "arms": [
            {"name": "control", "bp": 5000},
            {"name": "ltr", "bp": 5000, "fusion": {"type": "model", "model": LTR}}]},
        {"name": "rules_ab", "layer": "rules", "arms": [
            {"name": "control", "bp": 5000}, {"name": "home", "bp": 5000, "scene": "home"}]},
    ]  # fmt: skip
    exp_path = work / "ranking-assign.yaml"
    exp_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    config = load_ranking_config(exp_path, [*bundle.output_names, *request_fields(bundle.spec)])
    cache = VersionCache(registry, lambda mv: ModelRuntime.load(mv, providers="cpu"))
    compiled = compile_plan(config, bundle, request_fields(bundle.spec), cache)
    users = [f"user-{i}" for i in range(plan.assign_calls)]
    per_call: dict[str, float] = {}
    for label, scene in (("two experiments", "default"), ("no experiment", "formula")):
        compiled.variant(scene, users[0])
        t0 = time.perf_counter()
        for u in users:
            compiled.variant(scene, u)
        per_call[label] = (time.perf_counter() - t0) / len(users) * 1e6
    header = "fusion_ab=ltr, rules_ab=home"
    t0 = time.perf_counter()
    for _ in range(plan.assign_calls // 10):
        parse_arm_header(header, compiled.arms)
    per_call["X-Mtrank-Arm parse"] = (time.perf_counter() - t0) / (plan.assign_calls // 10) * 1e6
    return {"us_per_call": {k: round(v, 3) for k, v in per_call.items()},
            "calls": plan.assign_calls,
            "target_met": per_call["two experiments"] <= 10.0}  # fmt: skip


def shadow_cost(url: str, port: int, world: World, plan: Plan, path: Path,
                texts: tuple[str, str]) -> dict[str, Any]:  # fmt: skip
    plain, shadowed = texts
    out: dict[str, Any] = {}
    for n in plan.ns:
        body_list = bodies(world, n, plan.users, "default", seed=2)
        rps: dict[str, list[float]] = {"off": [], "on": []}
        runs = {"ok": 0.0, "error": 0.0, "timeout": 0.0, "busy": 0.0}
        requests_on = 0.0
        for r in range(plan.rounds):
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                reload(url, path, shadowed if mode == "on" else plain)
                throughput(port, body_list, min(1.0, plan.tput_seconds / 3))  # settle
                before = shadow_counts(url)
                x = throughput(port, body_list, plan.tput_seconds)
                time.sleep(1.5)  # let in-flight shadows of this run finish or time out
                after = shadow_counts(url)
                rps[mode].append(x)
                if mode == "on":
                    requests_on += x * plan.tput_seconds
                    for k in runs:
                        runs[k] += after[k] - before[k]
            print(
                f"  N={n} round {r + 1}/{plan.rounds}: off {rps['off'][-1]:.1f} req/s, "
                f"on {rps['on'][-1]:.1f} req/s, load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
        off, on = float(np.median(rps["off"])), float(np.median(rps["on"]))
        total = sum(runs.values())
        out[str(n)] = {
            "rps_off": rps["off"], "rps_on": rps["on"], "median_off": round(off, 2),
            "median_on": round(on, 2), "cost": round(1 - on / off, 4),
            "shadow_runs": runs, "completed_share": round(runs["ok"] / total, 4) if total else 0,
            "target_met": 1 - on / off <= 0.15,
        }  # fmt: skip
    return out


# ------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args(argv_of(argv))
    started = time.perf_counter()
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    work = DATA / ("experiments-quick" if args.quick else "experiments")
    load_before = [round(x, 2) for x in os.getloadavg()]
    print(f"preparing the world in {work} (load {load_before}) ...", flush=True)
    world = prepare_world(work, plan.world)
    prepare_ltr(world, work, args.quick)
    path, plain, shadowed = ranking_configs(work)
    print("assignment, in process ...", flush=True)
    assign = assignment_cost(world, plan, work)
    env = {
        "MTRANK_MODEL_DIR": str(world.root), "MTRANK_MODEL_NAMES": NAME,
        "MTRANK_SNAPSHOT_PATH": str(world.snap_path), "MTRANK_RANKING_CONFIG": str(path),
        "MTRANK_ORT_INTRA_THREADS": "1", "MTRANK_RELOAD_POLL_SECONDS": "0",
        "MTRANK_CONFIG_POLL_SECONDS": "0", "MTRANK_ADMIN_TOKEN": TOKEN,
        "MTRANK_MAX_CANDIDATES": "2000", "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    with ServiceProcess(env, workers=1) as service:
        url, port = service.base_url, service.port
        print("LTR fusion against the formula, N = 500, concurrency 1 ...", flush=True)
        fusion = fusion_overhead(url, port, world, plan)
        print("shadow at 100% against none, concurrency 8 ...", flush=True)
        shadow = shadow_cost(url, port, world, plan, path, (plain, shadowed))
    load_after = [round(x, 2) for x in os.getloadavg()]

    f = fusion["ms"]
    print(format_table(["/rank N=500", "p50 ms", "p90 ms", "p99 ms", "n"],
                       [[s, f[s]["p50"], f[s]["p90"], f[s]["p99"], f[s]["n"]]
                        for s in ("formula", "learned")]))  # fmt: skip
    print(f"learned fusion adds {fusion['added_p50_ms']:.3f} ms at p50 (target <= 1 ms): "
          f"{'met' if fusion['target_met'] else 'missed'}; fusion stage mean "
          f"{fusion['stage_means_ms']['formula'].get('fusion')} -> "
          f"{fusion['stage_means_ms']['learned'].get('fusion')} ms")  # fmt: skip
    print(format_table(["assignment", "us per call"], list(assign["us_per_call"].items())))
    rows = [[n, d["median_off"], d["median_on"], f"{d['cost']:.1%}", d["completed_share"],
             "met" if d["target_met"] else "missed"] for n, d in shadow.items()]  # fmt: skip
    print(format_table(["N", "req/s no shadow", "req/s shadow 100%", "throughput cost",
                        "shadows completed", "<= 15%"], rows))  # fmt: skip
    print(f"load average before {load_before}, after {load_after} on {os.cpu_count()} cpus")
    json_path, _ = output_paths("experiments", args)
    write_result(json_path, "experiments", argv_of(argv), started, {
        "fusion": fusion, "assignment": assign, "shadow": shadow, "world": world.size,
        "load_before": load_before, "load_after": load_after, "size": SIZE,
    })  # fmt: skip
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
