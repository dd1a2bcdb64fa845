"""The snapshot loader against a real Redis: versioned keys, an atomic pointer switch, expiry.

Every test uses its own namespace on the shared redis-server, deleted afterwards. The stores that
read what it writes are tested in tests/service/test_stores.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from mtrank.snapshot import Snapshot, item_key, meta_key, pointer_key, user_key
from mtrank.snapshot_loader import load_snapshot_to_redis, stored_versions
from tests.support import redis_namespace
from tests.support.onnx_model import build_test_snapshot, make_spec


@pytest.fixture
def ns() -> Iterator[tuple[redis.Redis, str]]:
    with redis_namespace() as pair:
        yield pair


def snapshot(version: str, seed: int = 0) -> Snapshot:
    return build_test_snapshot(make_spec(), n_users=6, n_items=12, seed=seed, version=version)


def test_bad_arguments_are_refused_before_anything_is_written(
    ns: tuple[redis.Redis, str],
) -> None:
    client, namespace = ns
    with pytest.raises(ValueError, match="use letters, digits"):
        load_snapshot_to_redis(client, namespace, snapshot("v 1"))
    with pytest.raises(ValueError, match="must be positive"):
        load_snapshot_to_redis(client, namespace, snapshot("v1"), batch_size=0)
    assert list(client.scan_iter(match=f"mtrank:{namespace}:*")) == []


def test_pointer_switches_only_after_the_whole_snapshot_is_written(
    ns: tuple[redis.Redis, str],
) -> None:
    client, namespace = ns
    load_snapshot_to_redis(client, namespace, snapshot("v1"))
    seen: list[tuple[int, object]] = []

    def watch(written: int) -> None:
        seen.append((written, client.get(pointer_key(namespace))))

    load_snapshot_to_redis(client, namespace, snapshot("v2", seed=1), batch_size=4, progress=watch)
    assert [n for n, _ in seen] == [4, 4, 4, 4, 2]  # 6 users + 12 items in batches of 4
    assert all(p == b"v1" for _, p in seen)  # readers kept v1 during the whole write
    assert client.get(pointer_key(namespace)) == b"v2"

    def crash(written: int) -> None:
        raise RuntimeError("loader died")

    with pytest.raises(RuntimeError, match="loader died"):
        load_snapshot_to_redis(
            client, namespace, snapshot("v3", seed=2), batch_size=4, progress=crash
        )
    assert client.get(pointer_key(namespace)) == b"v2"  # a failed load never moves the pointer


def test_old_versions_expire_instead_of_vanishing(ns: tuple[redis.Redis, str]) -> None:
    client, namespace = ns
    for k, version in enumerate(["v1", "v2", "v3"]):
        summary = load_snapshot_to_redis(
            client, namespace, snapshot(version, seed=k), ttl_old_s=600
        )
    assert summary["previous_version"] == "v2" and summary["expired_versions"] == ["v1"]
    assert set(stored_versions(client, namespace)) == {"v1", "v2", "v3"}
    for version, expiring in (("v1", True), ("v2", False), ("v3", False)):
        for key in (
            meta_key(namespace, version),
            user_key(namespace, version, "u0"),
            item_key(namespace, version, "i5"),
        ):
            ttl = client.ttl(key)
            assert (0 < ttl <= 600) if expiring else ttl == -1, (key, ttl)
    # an expiring version is left alone by the next load (its TTL is not pushed back)
    client.expire(meta_key(namespace, "v1"), 100)
    assert (
        load_snapshot_to_redis(client, namespace, snapshot("v3", seed=2))["expired_versions"] == []
    )
    assert client.ttl(meta_key(namespace, "v1")) <= 100


def test_loading_the_same_snapshot_twice_is_harmless(ns: tuple[redis.Redis, str]) -> None:
    client, namespace = ns
    snap = snapshot("v1")
    load_snapshot_to_redis(client, namespace, snap)
    keys1 = sorted(client.scan_iter(match=f"mtrank:{namespace}:*"))
    values1 = client.mget([k for k in keys1 if not k.endswith(b":meta")])
    again = load_snapshot_to_redis(client, namespace, snap)
    keys2 = sorted(client.scan_iter(match=f"mtrank:{namespace}:*"))
    assert again["previous_version"] == "v1" and again["expired_versions"] == []
    assert keys1 == keys2 and client.get(pointer_key(namespace)) == b"v1"
    assert client.mget([k for k in keys2 if not k.endswith(b":meta")]) == values1
    assert all(client.ttl(k) == -1 for k in keys2)
