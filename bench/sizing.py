"""Memory sizing: what a snapshot of N items (and M users) costs in Redis, in process and on disk.

Records have the real layout of the served model's feature spec (``mtrank/snapshot.py``: packed
sparse indices, dense values and rule attributes) and ids in the synthetic generator's format
(users 1.., items 1000001..). Three figures per entity count:

- **Redis**: ``INFO memory`` ``used_memory`` after minus before loading the snapshot with the
  service's own loader (``load_snapshot_to_redis``) into a private ``redis-server`` on a free
  loopback port (no persistence, nothing else in it). Items and users are loaded separately, so
  each has its own delta; per million is the delta scaled linearly (Redis memory per key is
  flat in the key count apart from the hash table's power-of-two growth, which is why the size
  loaded is stated next to the figure).
- **Embedded store**: resident memory (VmRSS) of a fresh Python process before and after it
  builds an ``EmbeddedFeatureStore`` from the snapshot file (what one worker without Redis
  holds), measured in a child process so nothing else of this script is in the figure.
- **Snapshot file**: size of the ``.npz`` the features job writes.

The spec comes from a registry (``--model-dir`` / ``--model``); without one a tiny model is
trained and exported in a temporary directory by the real pipeline (harness/trained.py):
the record layout depends on the spec's feature list, not on the model's size.

    .venv/bin/python -m bench.sizing --items 200000 --users 200000 --json bench/results/sizing.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from harness.processes import RedisProcess, ServiceProcess, http_post, rss_kib
from mtrank.registry import Registry
from mtrank.snapshot import Snapshot, item_dtype, user_dtype
from mtrank.snapshot_loader import load_snapshot_to_redis
from mtrank.spec import FeatureSpec

MIB = 1024 * 1024


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--items", type=int, default=200_000, help="synthetic items to load")
    p.add_argument("--users", type=int, default=200_000, help="synthetic users to load")
    p.add_argument("--model-dir", type=Path, help="registry to take the spec from")
    p.add_argument("--model", default="ecommerce", help="model name in the registry")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="5,000 items and users (smoke test)")
    p.add_argument("--embedded-child", nargs=2, metavar=("SNAPSHOT", "SPEC_DIR"),
                   help=argparse.SUPPRESS)  # fmt: skip
    return p


# ------------------------------------------------------------------ records
def synthetic_snapshot(spec: FeatureSpec, n_users: int, n_items: int, seed: int) -> Snapshot:
    """A snapshot with the spec's exact record layout and plausible values.

    Values do not change the record size (fixed-width fields), only how well the ``.npz``
    would compress, and ``np.savez`` does not compress: random values are fine.
    """
    rng = np.random.default_rng(seed)
    users = np.zeros(n_users, dtype=user_dtype(spec))
    items = np.zeros(n_items, dtype=item_dtype(spec))
    for recs, (sparse, dense) in ((users, spec.fields("user")), (items, spec.fields("item"))):
        for j, f in enumerate(sparse):
            recs["sparse"][:, j] = rng.integers(0, max(1, f.vocab_size), len(recs))
        if dense:
            recs["dense"] = rng.standard_normal((len(recs), len(dense)), dtype=np.float32)
    items["category"] = rng.integers(0, 50, n_items)
    items["brand"] = rng.integers(0, 500, n_items)
    items["price"] = rng.gamma(2.0, 20.0, n_items).astype(np.float32)
    items["promoted"] = rng.random(n_items) < 0.05
    items["first_seen_day"] = 20_000 + rng.integers(0, 365, n_items)
    items["quality"] = rng.random(n_items).astype(np.float32)
    items["exposure_cap"] = np.where(rng.random(n_items) < 0.1, rng.integers(20, 200, n_items), -1)
    return Snapshot(
        spec_sha256=spec.sha256(),
        version=f"sizing-{seed}",
        # As training/features.py builds them: an array of Python strs, as wide as the longest.
        user_ids=np.array([str(u) for u in range(1, n_users + 1)]),
        users=users,
        item_ids=np.array([str(i) for i in range(1_000_001, 1_000_001 + n_items)]),
        items=items,
    )


def _only(snap: Snapshot, entity: str) -> Snapshot:
    """The snapshot with the other entity emptied (to measure one entity's Redis memory)."""
    keep_users = entity == "user"
    return Snapshot(
        snap.spec_sha256,
        snap.version,
        snap.user_ids if keep_users else snap.user_ids[:0],
        snap.users if keep_users else snap.users[:0],
        snap.item_ids[:0] if keep_users else snap.item_ids,
        snap.items[:0] if keep_users else snap.items,
    )


# ------------------------------------------------------------------ measurements
def redis_bytes(snap: Snapshot, entity: str) -> dict[str, Any]:
    """``used_memory`` delta of loading one entity's records into a fresh private Redis."""
    part = _only(snap, entity)
    n = len(part.user_ids) if entity == "user" else len(part.item_ids)
    with RedisProcess() as server:
        client = server.client()
        try:
            before = int(client.info("memory")["used_memory"])
            start = time.perf_counter()
            load_snapshot_to_redis(client, "sizing", part)
            seconds = time.perf_counter() - start
            after = int(client.info("memory")["used_memory"])
            keys = int(client.dbsize())
            version = str(client.info("server")["redis_version"])
        finally:
            client.close()
    delta = after - before
    return {
        "entity": entity,
        "records": n,
        "keys": keys,
        "redis_version": version,
        "used_memory_delta_bytes": delta,
        "bytes_per_record": delta / n,
        "mib_per_million": delta / n * 1e6 / MIB,
        "load_seconds": round(seconds, 2),
        "load_records_per_s": round(n / seconds),
    }


def embedded_child(snapshot_path: str, spec_dir: str) -> dict[str, Any]:
    """In a fresh process: RSS before and after building the embedded store."""
    from service.features.embedded import EmbeddedFeatureStore

    spec = FeatureSpec.load(Path(spec_dir))
    before = rss_kib(os.getpid())
    store = EmbeddedFeatureStore(snapshot_path, spec)
    after = rss_kib(os.getpid())
    return {"rss_before_kib": before, "rss_after_kib": after, "version": store.snapshot_version}


def embedded_bytes(snapshot_path: Path, spec_dir: Path, n_records: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.sizing", "--embedded-child",
           str(snapshot_path), str(spec_dir)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    child = json.loads(out.stdout)
    delta = (child["rss_after_kib"] - child["rss_before_kib"]) * 1024
    return {
        **child,
        "rss_delta_bytes": delta,
        "bytes_per_record": delta / n_records,
        "mib_per_million_records": delta / n_records * 1e6 / MIB,
    }


def ranker_rss(registry: Path, model: str, spec: FeatureSpec, seed: int) -> dict[str, Any]:
    """RSS of one ``mtrank serve --workers 1`` process (interpreter, libraries, ORT session of
    the model, Redis client) after start-up and 50 requests; its features are in a private
    Redis, so no snapshot is in the figure."""
    snap = synthetic_snapshot(spec, 100, 1_000, seed)
    with RedisProcess() as server:
        client = server.client()
        try:
            load_snapshot_to_redis(client, "sizing", snap)
        finally:
            client.close()
        env = {
            "MTRANK_MODEL_DIR": str(registry),
            "MTRANK_MODEL_NAMES": model,
            "MTRANK_REDIS_URL": server.url,
            "MTRANK_FEATURE_NAMESPACE": "sizing",
        }
        with ServiceProcess(env, workers=1) as ranker:
            assert ranker.proc is not None
            after_start = rss_kib(ranker.proc.pid)
            ids = [{"item_id": str(i)} for i in snap.item_ids[:100]]
            body = json.dumps({"user_id": "1", "candidates": ids, "size": 20}).encode()
            statuses = {http_post(ranker.base_url + "/rank", body)[0] for _ in range(50)}
            after_load = rss_kib(ranker.proc.pid)
    return {
        "rss_after_start_mib": after_start / 1024,
        "rss_after_50_requests_mib": after_load / 1024,
        "statuses": sorted(statuses),
        "model_onnx_bytes": sum(f.stat().st_size for f in registry.rglob("*.onnx")),
    }


def resolve_model(model_dir: Path | None, model: str, tmp: Path) -> tuple[Path, Path, str]:
    """(registry root, spec directory of the served version, where it came from); trains a
    tiny model with the real pipeline when no registry is given."""
    if model_dir is None:
        from harness.trained import build_trained_world

        print("no --model-dir: training a tiny model with the real pipeline ...", flush=True)
        world = build_trained_world(tmp / "world", impressions=5_000)
        where = "trained here (harness/trained.py, 5,000 impressions)"
        return world.root, world.model.path, where
    mv = Registry(model_dir).resolve(model)
    return model_dir, mv.path, f"{model_dir}/{model}/{mv.version}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mtrank-sizing-") as tmp_dir:
        tmp = Path(tmp_dir)
        registry, spec_dir, spec_from = resolve_model(args.model_dir, args.model, tmp)
        spec = FeatureSpec.load(spec_dir)
        snap = synthetic_snapshot(spec, args.users, args.items, args.seed)
        path = snap.save(tmp / "snapshot.npz")
        result: dict[str, Any] = {
            "spec": spec_from,
            "user_record_bytes": snap.users.dtype.itemsize,
            "item_record_bytes": snap.items.dtype.itemsize,
            "users": args.users,
            "items": args.items,
            "snapshot_file_bytes": path.stat().st_size,
            "redis": [redis_bytes(snap, "item"), redis_bytes(snap, "user")],
            "embedded": embedded_bytes(path, spec_dir, args.users + args.items),
            "ranker": ranker_rss(registry, args.model, spec, args.seed),
            "load_average": os.getloadavg(),
            "cpus": os.cpu_count(),
        }
    return result


def report(r: dict[str, Any]) -> str:
    lines = [
        f"spec: {r['spec']}",
        f"record bytes: user {r['user_record_bytes']}, item {r['item_record_bytes']}",
        f"snapshot file ({r['users']:,} users + {r['items']:,} items): "
        f"{r['snapshot_file_bytes'] / MIB:.1f} MiB",
    ]
    for red in r["redis"]:
        lines.append(
            f"redis {red['redis_version']}, {red['records']:,} {red['entity']} records: "
            f"+{red['used_memory_delta_bytes'] / MIB:.1f} MiB used_memory = "
            f"{red['bytes_per_record']:.0f} B/record -> {red['mib_per_million']:.0f} MiB per "
            f"million (linear), loaded at {red['load_records_per_s']:,} records/s"
        )
    emb = r["embedded"]
    lines.append(
        f"embedded store, {r['users'] + r['items']:,} records: RSS "
        f"+{emb['rss_delta_bytes'] / MIB:.1f} MiB = {emb['bytes_per_record']:.0f} B/record -> "
        f"{emb['mib_per_million_records']:.0f} MiB per million records"
    )
    rk = r["ranker"]
    lines.append(
        f"ranker, 1 worker on Redis (model.onnx {rk['model_onnx_bytes'] / 1024:.0f} KiB): RSS "
        f"{rk['rss_after_start_mib']:.0f} MiB after start, {rk['rss_after_50_requests_mib']:.0f}"
        f" MiB after 50 requests (statuses {rk['statuses']})"
    )
    lines.append(f"load average during the run: {r['load_average']}, cpus {r['cpus']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.embedded_child:
        print(json.dumps(embedded_child(*args.embedded_child)))
        return 0
    if args.quick:
        args.items = args.users = 5_000
    if args.items < 1 or args.users < 1:
        raise SystemExit("--items and --users must be >= 1")
    result = run(args)
    print(report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
