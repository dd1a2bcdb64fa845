"""A whole serving stack on loopback, as the reliability tests and the soak benchmark run it.

A :class:`ModelSource` is a registry holding the model the training pipeline exported
(:mod:`harness.trained`) and a small snapshot of its real records under short ids (``u{k}``,
``i{k}``), with exposure caps and categories the tests rely on. A :class:`Stack` is a private
``redis-server`` on a free port (no persistence) holding that snapshot, plus
``mtrank serve --workers 2`` on another free port reading it, with a ranking config over the
model's own outputs (scenes ``default`` and ``capped``). :func:`rank_bodies` makes requests that
address the snapshot.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from harness.processes import RedisProcess, ServiceProcess
from harness.trained import TrainedWorld
from mtrank.registry import Registry
from mtrank.snapshot import Snapshot
from mtrank.snapshot_loader import load_snapshot_to_redis
from mtrank.spec import FeatureSpec

ADMIN_TOKEN = "reliability-admin-token-0123456789"
N_USERS, N_ITEMS = 50, 200
OWN_CAP, OWN_CAP_ITEMS = 3, 10  # the last OWN_CAP_ITEMS items carry their own exposure cap
SCENE_CAP = 25  # default_daily_cap of the "capped" scene
NAMESPACE = "rel"
WORKERS = 2


@dataclass(frozen=True)
class ModelSource:
    """A registry with one promoted model version and a snapshot built for its spec."""

    root: Path
    name: str
    version: str
    spec: FeatureSpec
    snapshot: Snapshot

    @property
    def snapshot_path(self) -> Path:
        """The snapshot file (for an in-process app on the embedded store)."""
        return Registry(self.root).snapshot_dir(self.name) / f"{self.snapshot.version}.npz"

    def copy_to(self, dest: Path) -> ModelSource:
        """A private copy of the registry (tests that promote versions get their own)."""
        shutil.copytree(self.root, dest)
        return ModelSource(dest, self.name, self.version, self.spec, self.snapshot)


def build_model_source(root: Path, world: TrainedWorld) -> ModelSource:
    """The MMoE the training pipeline exported, in a registry under ``root``, and a snapshot.

    The snapshot keeps real encoded user/item records from the pipeline's snapshot under the
    short ids these tests address (``u{k}``, ``i{k}``), with caps and categories the tests set.
    """
    shutil.copytree(world.root, root, dirs_exist_ok=True)
    shutil.rmtree(Registry(root).snapshot_dir(world.model.name), ignore_errors=True)
    src = world.snapshot
    snap = Snapshot(
        spec_sha256=src.spec_sha256,
        version="rel-snap-1",
        user_ids=np.array([f"u{k}" for k in range(N_USERS)]),
        users=src.users[:N_USERS].copy(),
        item_ids=np.array([f"i{k}" for k in range(N_ITEMS)]),
        items=src.items[:N_ITEMS].copy(),
        attribute_tables=src.attribute_tables,
    )
    rng = np.random.default_rng(13)
    snap.items["exposure_cap"] = -1  # the scene decides...
    snap.items["exposure_cap"][-OWN_CAP_ITEMS:] = OWN_CAP  # ...except for these items
    snap.items["category"] = rng.integers(0, 8, N_ITEMS)
    snap.items["brand"] = rng.integers(0, 20, N_ITEMS)
    source = ModelSource(root, world.model.name, world.model.version, world.spec, snap)
    snap.save(source.snapshot_path)
    return source


def ranking_yaml(spec: FeatureSpec, formula: str | None = None) -> str:
    """A ranking config over the model's own outputs: scenes ``default`` and ``capped``."""
    if formula is None:
        formula = " * ".join(f"(0.05 + {t})" for t in spec.task_names) + " * (beta + price)"
        formula += " * rule_weight"
    return f"""
scenes:
  default:
    fusion:
      formula: {json.dumps(formula)}
      params: {{beta: 1.0}}
    rules:
      exposure_cap: {{enabled: true, default_daily_cap: 1000000000}}
      boosts:
        - {{name: promoted, when: [{{field: promoted, op: eq, value: 1}}], multiplier: 1.2}}
      diversity:
        - {{field: category, window: 3, max_count: 1}}
  capped:
    rules:
      exposure_cap: {{enabled: true, default_daily_cap: {SCENE_CAP}}}
"""


def write_ranking(dest: Path, spec: FeatureSpec) -> Path:
    dest.write_text(ranking_yaml(spec))
    return dest


# ------------------------------------------------------------------------------------ stacks
@dataclass
class Stack:
    """A private Redis with the snapshot loaded, and `mtrank serve` reading it."""

    redis: RedisProcess
    service: ServiceProcess
    source: ModelSource
    ranking_path: Path

    def load_snapshot(self) -> None:
        """What an operator does after a Redis restart that lost the data."""
        load_snapshot(self.redis, self.source.snapshot)


def load_snapshot(redis_proc: RedisProcess, snapshot: Snapshot) -> None:
    client = redis_proc.client()
    try:
        load_snapshot_to_redis(client, NAMESPACE, snapshot)
    finally:
        client.close()


def service_env(source: ModelSource, ranking: Path, redis_url: str, **extra: str) -> dict[str, str]:
    env = {
        "MTRANK_MODEL_DIR": str(source.root),
        "MTRANK_MODEL_NAMES": source.name,
        "MTRANK_REDIS_URL": redis_url,
        "MTRANK_FEATURE_NAMESPACE": NAMESPACE,
        "MTRANK_RANKING_CONFIG": str(ranking),
        "MTRANK_ORT_PROVIDERS": "cpu",
        "MTRANK_ORT_INTRA_THREADS": "1",
        "MTRANK_INFERENCE_THREADS": "1",
        # Generous for loopback: on a shared 2-core box under 32 connections a busy event loop
        # alone can hold a Redis reply past the 50 ms default, and the load tests assert that
        # no answer is degraded. The fault tests lower it (300 ms) to hit it on purpose.
        "MTRANK_REDIS_TIMEOUT_MS": "1000",
        "MTRANK_RELOAD_POLL_SECONDS": "0",
        # reloads here come from /admin/reload only, so the tests can count them exactly
        "MTRANK_CONFIG_POLL_SECONDS": "0",
        "MTRANK_ADMIN_TOKEN": ADMIN_TOKEN,
        "MTRANK_MAX_BODY_BYTES": str(4 << 20),
        "MTRANK_LOG_LEVEL": "info",
    }
    env.update(extra)
    return env


@dataclass
class StackFactory:
    tmp: Path
    source: ModelSource
    started: list[Stack]

    def __call__(self, private_registry: bool = False, workers: int = WORKERS, **env: str) -> Stack:
        n = len(self.started)
        source = (
            self.source.copy_to(self.tmp / f"registry-{n}") if private_registry else self.source
        )
        ranking = write_ranking(self.tmp / f"ranking-{n}.yaml", source.spec)
        redis_proc = RedisProcess().start()
        try:
            load_snapshot(redis_proc, source.snapshot)
            env_all = service_env(source, ranking, redis_proc.url, **env)
            service = ServiceProcess(env_all, workers=workers).start()
        except BaseException:
            redis_proc.__exit__(None, None, None)
            raise
        stack = Stack(redis_proc, service, source, ranking)
        self.started.append(stack)
        return stack

    def close(self) -> None:
        for stack in reversed(self.started):
            stack.service.__exit__(None, None, None)
            stack.redis.__exit__(None, None, None)


# ------------------------------------------------------------------------------------ bodies
def rank_bodies(
    n: int = 64, candidates: int = 50, size: int = 10, scene: str = "default", seed: int = 0,
    items: range = range(N_ITEMS - OWN_CAP_ITEMS),
) -> list[bytes]:  # fmt: skip
    """``n`` distinct /rank bodies over the snapshot's users and (uncapped) items."""
    rng = np.random.default_rng(seed)
    pool = np.asarray(list(items))
    out = []
    for _ in range(n):
        ids = rng.choice(pool, size=min(candidates, len(pool)), replace=False)
        body = {
            "user_id": f"u{int(rng.integers(0, N_USERS))}",
            "candidates": [{"item_id": f"i{int(i)}"} for i in ids],
            "size": size,
            "scene": scene,
        }
        out.append(orjson.dumps(body))
    return out


def cycle(bodies: list[bytes]) -> Callable[[int], bytes]:
    return lambda k: bodies[k % len(bodies)]
