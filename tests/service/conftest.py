"""Fixtures for the service tests: the model the training pipeline exported (tests/conftest.py),
published into a temp registry, a snapshot of its real encoded users and items under short ids, a
ranking config whose result can be computed from the model's onnxruntime outputs, and apps over
the embedded store or a real Redis.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from harness.trained import TrainedWorld
from mtrank.registry import ModelVersion, Registry
from mtrank.snapshot import Snapshot
from mtrank.snapshot_loader import load_snapshot_to_redis
from mtrank.spec import FeatureSpec
from service.app import create_app
from service.settings import Settings
from tests.support import REDIS_URL
from tests.support.app_client import AppClient
from tests.support.exported import ExportedModels, short_id_snapshot

ADMIN_TOKEN = "test-admin-token-0123456789"
# LOW_QUALITY splits the synthetic items' quality (0..1): 16 of the first 40 items fall below it.
ALPHA, BETA, BOOST, DEMOTE, LOW_QUALITY = 0.1, 1.0, 2.0, 0.5, 0.5

RANKING_YAML = f"""
scenes:
  default:
    fusion:
      formula: "ctr * (alpha + cvr) * (beta + price) * rule_weight"
      params: {{alpha: {ALPHA}, beta: {BETA}}}
    rules:
      exposure_cap: {{enabled: true, default_daily_cap: 1000}}
      boosts:
        - {{name: promoted, when: [{{field: promoted, op: eq, value: 1}}], multiplier: {BOOST}}}
      demotions:
        - name: low_quality
          when: [{{field: quality, op: lt, value: {LOW_QUALITY}}}]
          multiplier: {DEMOTE}
  diverse:
    rules:
      boosts:
        - {{name: promoted, when: [{{field: promoted, op: eq, value: 1}}], multiplier: {BOOST}}}
      demotions:
        - name: low_quality
          when: [{{field: quality, op: lt, value: {LOW_QUALITY}}}]
          multiplier: {DEMOTE}
      diversity:
        - {{field: category, window: 2, max_count: 1}}
  capped:
    rules:
      exposure_cap: {{enabled: true, default_daily_cap: 1}}
"""


@dataclass
class World:
    """A served model with its snapshot and config files, everything under one temp dir."""

    root: Path
    model: ModelVersion
    spec: FeatureSpec
    snapshot: Snapshot
    snapshot_path: Path
    ranking_path: Path

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "model_dir": self.root,
            "model_names": [self.model.name],
            "snapshot_path": self.snapshot_path,
            "ranking_config": self.ranking_path,
            "reload_poll_seconds": 0,
            "config_poll_seconds": 0,
            "admin_token": ADMIN_TOKEN,
            "max_candidates": 50,
            "max_body_bytes": 16_384,
            "ort_providers": "cpu",
            "redis_timeout_ms": 200,
        }
        values.update(overrides)
        return Settings(**values)


def make_world(
    root: Path, models: ExportedModels, trained: TrainedWorld, n_items: int = 40
) -> World:
    """The exported model as ``ecommerce`` under ``root``, with users u0..u7 and items i0.. taken
    from the pipeline's snapshot (real encoded features and attributes)."""
    model = models.publish(root, "ecommerce")
    spec = FeatureSpec.load(model.path)
    snap = short_id_snapshot(trained.snapshot, n_users=8, n_items=n_items, version="svc-snap-1")
    # Own caps off (-1 = scene default) so only the scene decides; categories in 4 groups.
    snap.items["exposure_cap"] = -1
    snap.items["category"] = np.arange(n_items) % 4
    low = snap.items["quality"] < LOW_QUALITY
    if low.all() or not low.any() or not (snap.items["promoted"] == 1).any():
        raise ValueError("the rules must fire on some items and not on others")
    path = Registry(root).snapshot_dir(model.name) / f"{snap.version}.npz"
    snap.save(path)
    ranking = root / "ranking.yaml"
    ranking.write_text(RANKING_YAML)
    return World(root, model, spec, snap, path, ranking)


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
    exported_models: ExportedModels,
    trained_world: TrainedWorld,
) -> World:
    return make_world(tmp_path_factory.mktemp("registry"), exported_models, trained_world)


@pytest.fixture
def own_world(
    tmp_path: Path, exported_models: ExportedModels, trained_world: TrainedWorld
) -> World:
    """A world of 20 items in this test's own registry, for tests that publish versions."""
    return make_world(tmp_path / "reg", exported_models, trained_world, n_items=20)


async def chunked(*parts: bytes) -> AsyncIterator[bytes]:
    """A request body sent without Content-Length."""
    for part in parts:
        yield part


@pytest.fixture
def client_for(world: World) -> Iterator[Callable[..., AppClient]]:
    """Start an app with settings overrides; every app started is shut down after the test."""
    started: list[AppClient] = []

    def start(raise_app_exceptions: bool = True, **overrides: Any) -> AppClient:
        client = AppClient(create_app(world.settings(**overrides)), raise_app_exceptions)
        started.append(client)
        return client

    yield start
    for client in reversed(started):
        client.close()


@pytest.fixture
def client(client_for: Callable[..., AppClient]) -> AppClient:
    return client_for()


@pytest.fixture
def redis_namespace(world: World) -> Iterator[str]:
    """The world's snapshot loaded into the real Redis under a namespace of this test only."""
    ns = f"test-api-{os.getpid()}-{os.urandom(4).hex()}"
    conn = redis.Redis.from_url(REDIS_URL)
    load_snapshot_to_redis(conn, ns, world.snapshot)
    yield ns
    keys = list(conn.scan_iter(match=f"mtrank:{ns}:*", count=1000))
    if keys:
        conn.delete(*keys)
    conn.close()


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port
