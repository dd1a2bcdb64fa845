"""How old the served features are: ``built_at`` from the snapshot build, through the file or
Redis, to ``mtrank_feature_snapshot_age_seconds`` on a running app."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtrank.snapshot import Snapshot, meta_key
from mtrank.snapshot_loader import load_snapshot_to_redis
from service.features.embedded import EmbeddedFeatureStore
from service.features.redis_store import RedisFeatureStore
from tests.service.conftest import World
from tests.support import REDIS_URL, redis_namespace
from tests.support.app_client import AppClient
from tests.support.onnx_model import build_test_snapshot, make_spec

SPEC = make_spec()
BUILT = 1_790_000_000.25  # a fixed build time, so every hop must carry it exactly


def snapshot(built_at: float = BUILT) -> Snapshot:
    snap = build_test_snapshot(SPEC, n_users=3, n_items=4, version="v1")
    return dataclasses.replace(snap, built_at=built_at)


class _Legacy(Snapshot):
    """A snapshot as written before metas carried ``built_at``."""

    def meta(self) -> dict[str, Any]:
        return {k: v for k, v in super().meta().items() if k != "built_at"}


def test_a_new_snapshot_is_stamped_when_built() -> None:
    before = time.time()
    snap = build_test_snapshot(SPEC, n_users=1, n_items=1)
    assert before <= snap.built_at <= time.time()
    assert snap.meta()["built_at"] == snap.built_at


def test_built_at_travels_through_the_file_and_leaves_the_records_alone(tmp_path: Path) -> None:
    snap = snapshot()
    path = snap.save(tmp_path / "v1.npz")
    assert json.loads(path.with_suffix(".json").read_text())["built_at"] == BUILT
    back = Snapshot.load(path, SPEC)
    assert back.built_at == BUILT
    assert back.users.tobytes() == snap.users.tobytes()
    assert back.items.tobytes() == snap.items.tobytes()
    assert EmbeddedFeatureStore(path, SPEC).snapshot_built_at == BUILT


def test_a_file_without_built_at_dates_from_when_it_was_written(tmp_path: Path) -> None:
    path = _Legacy(**vars(snapshot())).save(tmp_path / "old.npz")
    os.utime(path, (BUILT - 50.0, BUILT - 50.0))
    assert Snapshot.load(path, SPEC).built_at == BUILT - 50.0


def test_redis_store_reads_built_at_from_the_loaded_meta() -> None:
    async def built_at(namespace: str) -> float | None:
        store = RedisFeatureStore(REDIS_URL, namespace, SPEC, timeout_s=0.5)
        try:
            assert store.snapshot_built_at is None  # nothing resolved yet
            await store.resolve_snapshot()
            return store.snapshot_built_at
        finally:
            await store.close()

    with redis_namespace() as (client, namespace):
        load_snapshot_to_redis(client, namespace, snapshot())
        assert asyncio.run(built_at(namespace)) == BUILT
        # A snapshot loaded before metas carried built_at: its age is unknown, not invented.
        key = meta_key(namespace, "v1")
        meta = json.loads(client.get(key) or b"{}")
        client.set(key, json.dumps({k: v for k, v in meta.items() if k != "built_at"}))
        assert asyncio.run(built_at(namespace)) is None


def scraped_age(client: AppClient) -> float:
    text = client.get("/metrics").text
    found = re.search(r"^mtrank_feature_snapshot_age_seconds (\S+)$", text, flags=re.M)
    assert found, "no snapshot age in /metrics"
    return float(found.group(1))


def test_the_app_reports_the_age_and_the_configured_limit(
    tmp_path: Path, world: World, client_for: Callable[..., AppClient]
) -> None:
    # The world's own snapshot (it fits the model client_for serves), stamped at other times.
    def stamped(built_at: float, name: str) -> Path:
        return dataclasses.replace(world.snapshot, built_at=built_at).save(tmp_path / name)

    old = stamped(time.time() - 7200.0, "old.npz")
    client = client_for(snapshot_path=old, snapshot_max_age_seconds=3600.0)
    assert 7200.0 <= scraped_age(client) < 7260.0
    assert "mtrank_feature_snapshot_max_age_seconds 3600.0" in client.get("/metrics").text
    fresh = stamped(time.time(), "fresh.npz")
    assert scraped_age(client_for(snapshot_path=fresh)) < 60.0
