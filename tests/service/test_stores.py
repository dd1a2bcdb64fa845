"""Feature stores against a real Redis: one-round-trip fetch, hard exposure caps, outages.

Every test uses its own namespace on the shared redis-server (deleted afterwards); tests that
count commands or stop the server start a private redis-server on a free port.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from harness.processes import RedisProcess, free_port
from mtrank.snapshot import Snapshot, default_item_record, exposure_key, pointer_key
from mtrank.snapshot_loader import load_snapshot_to_redis
from mtrank.spec import FeatureSpec
from service.features.embedded import EmbeddedFeatureStore
from service.features.redis_store import RedisFeatureStore
from service.features.store import (
    EXPOSURE_TTL_S,
    FeatureStore,
    FeatureStoreError,
    FeatureStoreUnavailable,
    FetchResult,
)
from tests.support import REDIS_URL, redis_namespace, reserve_in_process
from tests.support.onnx_model import build_test_snapshot, make_spec

SPEC = make_spec()
OTHER_SPEC = make_spec(outputs=("ctr",))  # another contract: its snapshots must be refused
DAY = "20261123"
# hits, a miss, a duplicate, in an order unlike the snapshot's
IDS = ["i3", "i0", "nope", "i3", "i11"]


@pytest.fixture
def ns() -> Iterator[tuple[redis.Redis, str]]:
    with redis_namespace() as pair:
        yield pair


def snapshot(version: str, seed: int = 0, spec: FeatureSpec = SPEC) -> Snapshot:
    return build_test_snapshot(spec, n_users=6, n_items=12, seed=seed, version=version)


def expected_items(snap: Snapshot, ids: list[str]) -> tuple[bytes, list[bool]]:
    """The records a fetch of ``ids`` must return, built independently of the stores."""
    rows = {i: k for k, i in enumerate(snap.item_ids.tolist())}
    blank = default_item_record(SPEC).tobytes()
    data = b"".join(snap.items[rows[i]].tobytes() if i in rows else blank for i in ids)
    return data, [i in rows for i in ids]


def store(
    url: str, namespace: str, timeout_s: float = 0.5, refresh_s: float = 5.0
) -> RedisFeatureStore:
    return RedisFeatureStore(url, namespace, SPEC, timeout_s, refresh_s=refresh_s)


# ---------------------------------------------------------------- fetch
def test_loaded_snapshot_is_fetched_exactly(ns: tuple[redis.Redis, str]) -> None:
    client, namespace = ns
    snap = snapshot("v1")
    summary = load_snapshot_to_redis(client, namespace, snap, batch_size=5)
    assert summary["version"] == "v1" and summary["records_written"] == 18
    assert client.get(pointer_key(namespace)) == b"v1"

    async def go() -> tuple[FetchResult, FetchResult]:
        s = store(REDIS_URL, namespace)
        try:
            fetched = await s.fetch("u4", IDS, DAY), await s.fetch("stranger", [], DAY)
            assert s.snapshot_version == "v1" and s.snapshot_built_at == snap.built_at
            return fetched
        finally:
            await s.close()

    hit, cold = asyncio.run(go())
    assert hit.user_found and hit.user.tobytes() == snap.users[4].tobytes()
    data, found = expected_items(snap, IDS)
    assert hit.items.tobytes() == data and hit.item_found.tolist() == found
    assert hit.exposures.tolist() == [0] * 5 and hit.exposures.dtype == np.int64
    assert not cold.user_found and cold.items.shape == (0,) and cold.exposures.shape == (0,)


def test_fetch_is_one_round_trip() -> None:
    with RedisProcess() as server:
        load_snapshot_to_redis(server.client(), "rt", snapshot("v1"))

        async def go() -> tuple[int, int, int]:
            s = store(server.url, "rt", refresh_s=60)
            try:
                await s.fetch("u1", IDS, DAY)  # resolves the version, opens the connection
                with server.client() as c:
                    mget0 = c.info("commandstats")["cmdstat_mget"]["calls"]
                    total0 = c.info("stats")["total_commands_processed"]
                    r = await s.fetch("u2", IDS * 40, DAY)  # 200 items
                    total1 = c.info("stats")["total_commands_processed"]
                    mget1 = c.info("commandstats")["cmdstat_mget"]["calls"]
                assert r.item_found.sum() == 4 * 40
                return mget1 - mget0, total1 - total0, len(IDS) * 40
            finally:
                await s.close()

        mgets, commands, _ = asyncio.run(go())
    assert mgets == 1
    # the fetch's MGET plus the first INFO (a command is counted once it has run)
    assert commands == 2


# ---------------------------------------------------------------- snapshot version
def test_snapshot_for_another_spec_is_refused(ns: tuple[redis.Redis, str]) -> None:
    client, namespace = ns
    load_snapshot_to_redis(client, namespace, snapshot("wrong", spec=OTHER_SPEC))

    async def go() -> bool:
        s = store(REDIS_URL, namespace)
        try:
            with pytest.raises(FeatureStoreError, match="was built for feature spec") as e:
                await s.fetch("u1", IDS, DAY)
            assert not isinstance(e.value, FeatureStoreUnavailable)
            return await s.ping()
        finally:
            await s.close()

    assert asyncio.run(go()) is False


def test_no_snapshot_loaded_is_unavailable_not_fatal(ns: tuple[redis.Redis, str]) -> None:
    client, namespace = ns

    async def go() -> str | None:
        s = store(REDIS_URL, namespace)
        try:
            with pytest.raises(FeatureStoreUnavailable, match="no feature snapshot loaded"):
                await s.fetch("u1", IDS, DAY)
            load_snapshot_to_redis(client, namespace, snapshot("v1"))  # loaded later
            await s.fetch("u1", IDS, DAY)
            return s.snapshot_version
        finally:
            await s.close()

    assert asyncio.run(go()) == "v1"


def test_background_refresh_follows_the_pointer(ns: tuple[redis.Redis, str]) -> None:
    client, namespace = ns
    v1, v2 = snapshot("v1"), snapshot("v2", seed=1)
    load_snapshot_to_redis(client, namespace, v1)

    async def go() -> None:
        s = store(REDIS_URL, namespace, refresh_s=0.05)
        try:
            assert (await s.fetch("u1", ["i2"], DAY)).items.tobytes() == v1.items[2].tobytes()
            load_snapshot_to_redis(client, namespace, v2)
            await asyncio.sleep(0.3)
            assert s.snapshot_version == "v2"
            assert (await s.fetch("u1", ["i2"], DAY)).items.tobytes() == v2.items[2].tobytes()
            # an incompatible snapshot behind the pointer: keep serving v2, report the error
            load_snapshot_to_redis(client, namespace, snapshot("bad", spec=OTHER_SPEC))
            await asyncio.sleep(0.3)
            assert s.snapshot_version == "v2" and "feature spec" in (s.last_error or "")
            assert (await s.fetch("u1", ["i2"], DAY)).item_found.tolist() == [True]
        finally:
            await s.close()

    asyncio.run(go())


# ---------------------------------------------------------------- exposure caps
def test_reservation_semantics(ns: tuple[redis.Redis, str]) -> None:
    client, namespace = ns
    load_snapshot_to_redis(client, namespace, snapshot("v1"))

    async def go() -> list[list[bool]]:
        s = store(REDIS_URL, namespace)
        try:
            caps = np.array([2, 2, 2, 0, -1])
            out = [(await s.reserve_exposures(["a", "a", "a", "b", "c"], caps, DAY)).tolist()]
            out.append((await s.reserve_exposures(["a", "c"], np.array([3, -1]), DAY)).tolist())
            out.append((await s.reserve_exposures(["a"], np.array([3]), "20261124")).tolist())
            counts = (await s.fetch("u1", ["a", "b", "c"], DAY)).exposures.tolist()
            assert (await s.reserve_exposures([], np.zeros(0), DAY)).shape == (0,)
            with pytest.raises(ValueError, match="caps has shape"):
                await s.reserve_exposures(["a"], np.array([1, 2]), DAY)
            return [*out, counts]
        finally:
            await s.close()

    first, second, other_day, counts = asyncio.run(go())
    assert first == [True, True, False, False, True]  # in order; duplicates count; 0 = never
    assert second == [True, True]  # a raised cap lets one more through
    assert other_day == [True]  # counters are per day
    assert counts == [3, 0, 2]
    assert 0 < client.ttl(exposure_key(namespace, DAY, "a")) <= EXPOSURE_TTL_S


def test_cap_is_hard_across_connections_and_processes(ns: tuple[redis.Redis, str]) -> None:
    client, namespace = ns
    items = ["hot", "warm", "cold"]
    caps = [7, 40, 1000]
    per_call = 200
    ctx = multiprocessing.get_context("spawn")
    go_signal, results = ctx.Event(), ctx.Queue()
    child = ctx.Process(
        target=reserve_in_process,
        args=(REDIS_URL, namespace, DAY, items, caps, per_call, go_signal, results),
    )
    child.start()

    async def here() -> np.ndarray:
        # generous deadline: this measures correctness under contention on a shared 2-core box
        stores = [
            store(REDIS_URL, namespace, timeout_s=5),
            store(REDIS_URL, namespace, timeout_s=5),
        ]
        try:
            go_signal.set()
            masks = await asyncio.gather(
                *(
                    stores[k % 2].reserve_exposures(items, np.array(caps), DAY)
                    for k in range(per_call)
                )
            )
            return np.asarray(np.sum(masks, axis=0))
        finally:
            for s in stores:
                await s.close()

    mine = asyncio.run(here())
    theirs = np.array(results.get(timeout=15))
    child.join(timeout=15)
    assert child.exitcode == 0
    total = mine + theirs
    assert total.tolist() == [7, 40, 2 * per_call]  # never above the cap, and the cap is reached
    assert theirs.sum() > 0 and mine.sum() > 0  # both processes took part

    counters = client.mget([exposure_key(namespace, DAY, i) for i in items])
    assert counters == [b"7", b"40", str(2 * per_call).encode()]


# ---------------------------------------------------------------- outages
def test_closed_port_is_unavailable_fast() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"

    async def go() -> None:
        s = store(url, "down", timeout_s=0.2)
        try:
            for call in (
                lambda: s.fetch("u1", IDS, DAY),
                lambda: s.reserve_exposures(["a"], np.array([1]), DAY),
            ):
                start = time.perf_counter()
                with pytest.raises(FeatureStoreUnavailable, match="failed"):
                    await call()
                assert time.perf_counter() - start < 0.5
            assert await s.ping() is False
        finally:
            await s.close()

    asyncio.run(go())


def test_unresponsive_server_times_out_within_the_deadline() -> None:
    # A socket that accepts connections (kernel backlog) but never answers: reads hang.
    with socket.socket() as sink:
        sink.bind(("127.0.0.1", 0))
        sink.listen(16)
        url = f"redis://127.0.0.1:{sink.getsockname()[1]}/0"

        async def go() -> float:
            s = store(url, "hang", timeout_s=0.2)
            try:
                start = time.perf_counter()
                with pytest.raises(FeatureStoreUnavailable):
                    await s.fetch("u1", IDS, DAY)
                return time.perf_counter() - start
            finally:
                await s.close()

        assert asyncio.run(go()) < 0.6


def test_store_recovers_when_redis_comes_back() -> None:
    with RedisProcess() as server:
        load_snapshot_to_redis(server.client(), "rec", snapshot("v1"))

        async def go() -> None:
            s = store(server.url, "rec", timeout_s=0.3, refresh_s=0.05)
            try:
                assert (await s.fetch("u1", IDS, DAY)).user_found
                assert (await s.reserve_exposures(["a"], np.array([5]), DAY)).tolist() == [True]
                server.stop()
                with pytest.raises(FeatureStoreUnavailable):
                    await s.fetch("u1", IDS, DAY)
                with pytest.raises(FeatureStoreUnavailable):
                    await s.reserve_exposures(["a"], np.array([5]), DAY)
                assert await s.ping() is False
                await asyncio.sleep(0.15)  # the refresher fails meanwhile, and must not latch
                server.start()  # empty: no data, no cached Lua script
                load_snapshot_to_redis(server.client(), "rec", snapshot("v1"))
                got = await s.fetch("u1", IDS, DAY)
                assert got.user_found and got.item_found.sum() == 4
                assert (await s.reserve_exposures(["a"], np.array([5]), DAY)).tolist() == [True]
                assert await s.ping() is True
            finally:
                await s.close()

        asyncio.run(go())


# ---------------------------------------------------------------- embedded == redis
def test_embedded_store_answers_like_the_redis_store(
    ns: tuple[redis.Redis, str], tmp_path: Path
) -> None:
    client, namespace = ns
    snap = snapshot("v1")
    load_snapshot_to_redis(client, namespace, snap)
    embedded = EmbeddedFeatureStore(snap.save(tmp_path / "snap.npz"), SPEC)
    assert isinstance(embedded, FeatureStore)

    async def both() -> None:
        remote = store(REDIS_URL, namespace)
        assert isinstance(remote, FeatureStore)
        try:
            stores: list[FeatureStore] = [remote, embedded]
            caps = np.array([1, 2, -1, 0, 1])
            for _ in range(3):
                masks = [await s.reserve_exposures(IDS, caps, DAY) for s in stores]
                np.testing.assert_array_equal(masks[0], masks[1])
            for user in ("u0", "u5", "nobody"):
                a, b = [await s.fetch(user, IDS, DAY) for s in stores]
                assert a.user.tobytes() == b.user.tobytes() and a.user_found == b.user_found
                assert a.items.tobytes() == b.items.tobytes()
                assert a.item_found.tolist() == b.item_found.tolist()
                assert a.exposures.tolist() == b.exposures.tolist() == [1, 2, 3, 1, 1]
            assert remote.snapshot_version == embedded.snapshot_version == "v1"
            assert remote.snapshot_built_at == embedded.snapshot_built_at == snap.built_at
            assert await remote.ping() and await embedded.ping()
        finally:
            await remote.close()
            await embedded.close()

    asyncio.run(both())


def test_embedded_store_refuses_a_snapshot_for_another_spec(tmp_path: Path) -> None:
    path = snapshot("x", spec=OTHER_SPEC).save(tmp_path / "other.npz")
    with pytest.raises(FeatureStoreError, match="rebuild it"):
        EmbeddedFeatureStore(path, SPEC)
    with pytest.raises(FeatureStoreError, match="was built for spec"):
        EmbeddedFeatureStore(snapshot("x", spec=OTHER_SPEC), SPEC)
    with pytest.raises(FeatureStoreError, match="cannot load"):
        EmbeddedFeatureStore(tmp_path / "missing.npz", SPEC)
