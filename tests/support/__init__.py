"""Shared helpers of the service tests: real Redis namespaces.

Tests talk to the real redis-server on 127.0.0.1:6379 under a namespace unique to the test,
deleted afterwards; tests that must see the whole server (command counts, a server going down)
start their own ``redis-server`` on a free port (:class:`harness.processes.RedisProcess`).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import redis

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def unique_namespace(prefix: str = "test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def delete_namespace(client: redis.Redis, namespace: str) -> int:
    """Delete every key under ``mtrank:{namespace}:`` (the snapshot and the counters)."""
    n = 0
    for key in client.scan_iter(match=f"mtrank:{namespace}:*", count=1000):
        n += int(client.delete(key))
    return n


@contextlib.contextmanager
def redis_namespace(url: str = REDIS_URL) -> Iterator[tuple[redis.Redis, str]]:
    """A sync client and a fresh namespace, cleaned up afterwards."""
    client = redis.Redis.from_url(url)
    namespace = unique_namespace()
    try:
        yield client, namespace
    finally:
        delete_namespace(client, namespace)
        client.close()


def reserve_in_process(
    url: str,
    namespace: str,
    day: str,
    item_ids: list[str],
    caps: list[int],
    calls: int,
    start: Any,  # multiprocessing Event
    results: Any,  # multiprocessing Queue
) -> None:
    """Child-process body of the cross-process cap test: ``calls`` concurrent reservations.

    Waits for ``start`` so both processes hammer the counters at the same time, then puts the
    number of accepted reservations per item on ``results``.
    """
    import asyncio

    import numpy as np

    from service.features.redis_store import RedisFeatureStore
    from tests.support.onnx_model import make_spec

    async def run() -> list[int]:
        store = RedisFeatureStore(url, namespace, make_spec(), timeout_s=5.0)
        try:
            await store.ping()  # connect before the start signal
            start.wait(10)
            masks = await asyncio.gather(
                *(store.reserve_exposures(item_ids, np.array(caps), day) for _ in range(calls))
            )
            return [int(x) for x in np.sum(masks, axis=0)]
        finally:
            await store.close()

    results.put(asyncio.run(run()))
