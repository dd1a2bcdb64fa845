"""Fixtures of the reliability tests: a model registry, private Redis servers, real `mtrank serve`.

Model creation lives in ONE fixture, :func:`served_model`: it builds a small real ONNX model and
its feature snapshot with tests/support/onnx_model.py. Swapping in a model exported by the
training pipeline means changing that fixture only; everything else (new versions for hot
reload, corrupt copies) is derived from whatever it produced, by copying the version directory.

Each stack is a private ``redis-server`` on a free port (no persistence) holding the snapshot,
plus ``mtrank serve --workers 2`` on another free port, both on 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from mtrank.registry import METADATA_FILE, MODEL_FILE, ModelVersion, Registry
from mtrank.snapshot import Snapshot
from mtrank.spec import FeatureSpec
from service.features.loader import load_snapshot_to_redis
from tests.support.servers import RedisProcess, ServiceProcess
from tests.support.trained import TrainedWorld

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


@pytest.fixture(scope="session")
def served_model(
    trained_world: TrainedWorld, tmp_path_factory: pytest.TempPathFactory
) -> ModelSource:
    """THE model of these tests: exported by the real training pipeline (tests/conftest.py)."""
    return build_model_source(tmp_path_factory.mktemp("rel-registry"), trained_world)


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


def publish_copy(
    source: ModelSource, version: str, mutate: Callable[[Path], None] | None = None
) -> ModelVersion:
    """Publish a copy of the served version under a new version name (not promoted).

    ``mutate(staging_dir)`` may break the copy (truncate model.onnx, rename an input). The
    copy's metadata loses ``onnx_sha256`` so ONNX Runtime itself, not the checksum, judges it.
    """
    registry = Registry(source.root)
    staging = registry.staging_dir(source.name)
    src = registry.resolve(source.name, source.version).path
    for item in src.iterdir():
        shutil.copy2(item, staging / item.name)
    meta_path = staging / METADATA_FILE
    meta: dict[str, Any] = json.loads(meta_path.read_text())
    meta.pop("onnx_sha256", None)
    meta_path.write_text(json.dumps(meta))
    if mutate is not None:
        mutate(staging)
    return registry.publish(source.name, staging, version)


def truncate_model(staging: Path) -> None:
    path = staging / MODEL_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def rename_sparse_input(spec: FeatureSpec) -> Callable[[Path], None]:
    """A mutation giving the graph's sparse input another name than the spec's."""

    def mutate(staging: Path) -> None:
        import onnx

        path = staging / MODEL_FILE
        model = onnx.load(str(path))
        old, new = spec.sparse_input, spec.sparse_input + "_renamed"
        for value in model.graph.input:
            if value.name == old:
                value.name = new
        for node in model.graph.node:
            for k, name in enumerate(node.input):
                if name == old:
                    node.input[k] = new
        onnx.save(model, str(path))

    return mutate


# Fusion formulas that try to reach Python or blow up: each must be refused at load.
HOSTILE_FORMULAS = [
    "ctr.__class__",
    "ctr.__class__.__mro__[1].__subclasses__()",
    "__import__('os').system('true')",
    "__builtins__",
    "__class__",
    "open('/etc/passwd')",
    "eval('1')",
    "exec('x = 1')",
    "getattr(ctr, 'real')",
    "exp(ctr).real",
    "lambda: ctr",
    "(lambda x: x)(ctr)",
    "9**9**9",
    "ctr ** 1000",
    "2 ** 65",
    "[x for x in ctr]",
    "sum(x for x in ctr)",
    "{x: 1 for x in ctr}",
    "ctr[0]",
    "ctr if cvr else 1",
    "ctr and cvr",
    "ctr < cvr",
    "(x := ctr)",
    "f'{ctr}'",
    "'ctr'",
    "b'x'",
    "min(*ctr)",
    "max(ctr, key=cvr)",
    "ctr // 2",
    "ctr % 2",
    "~ctr",
    "not ctr",
    "1e999",
    "ctr; import os",
    "(" * 200 + "ctr" + ")" * 200,
    "-" * 5000 + "ctr",
]


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


@pytest.fixture(scope="module")
def make_stack(
    served_model: ModelSource, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StackFactory]:
    """Start stacks for one test module; all are shut down when the module ends."""
    factory = StackFactory(tmp_path_factory.mktemp("rel-stack"), served_model, [])
    yield factory
    factory.close()


@pytest.fixture(scope="session")
def main_stack(
    served_model: ModelSource, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """One stack shared by the load, counter and hostile-input tests (they do not break it)."""
    factory = StackFactory(tmp_path_factory.mktemp("rel-main"), served_model, [])
    try:
        yield factory()
    finally:
        factory.close()


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


def summary_of(status: int, body: bytes) -> dict[str, Any] | None:
    """What the load tests keep of a response: items, degraded reasons, model version."""
    if status != 200:
        return {"error": body[:300].decode(errors="replace")}
    data = orjson.loads(body)
    return {
        "items": [x["item_id"] for x in data["items"]],
        "degraded": data["degraded"],
        "version": data["model"]["version"],
    }


# ------------------------------------------------------------------------------------ figures
FIGURES: dict[str, str] = {}


@pytest.fixture
def report_figure(record_property: Callable[[str, object], None]) -> Callable[[str, str], None]:
    """Record a measured figure: shown in the terminal summary and in JUnit XML properties."""

    def record(name: str, value: str) -> None:
        FIGURES[name] = value
        record_property(name, value)

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("mtrank reliability figures")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")
