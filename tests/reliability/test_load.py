"""Load and counters against `mtrank serve --workers 2` backed by a private redis-server.

A closed loop of 32 keep-alive connections for 20 s must see no 5xx, no dropped connection and
no degraded response; its p99 is reported. Exposure counters shared by the two workers through
Redis must equal what the responses returned, and the (hard) caps must hold.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from harness.load import run_load
from harness.processes import metric_value
from harness.stack import (
    N_ITEMS,
    NAMESPACE,
    OWN_CAP,
    OWN_CAP_ITEMS,
    SCENE_CAP,
    Stack,
    cycle,
    rank_bodies,
)
from mtrank.snapshot import exposure_key
from service.features.store import utc_day
from tests.reliability.conftest import summary_of

pytestmark = pytest.mark.integration
LOAD_SECONDS, CONCURRENCY = 20.0, 32


def test_closed_loop_load_two_workers(
    main_stack: Stack, report_figure: Callable[[str, str], None]
) -> None:
    service = main_stack.service
    assert len(service.worker_pids()) == 2
    before = metric_value(service.metrics(), "mtrank_requests_total", {"status": "200"})
    result = asyncio.run(
        run_load(
            service.port, cycle(rank_bodies()), concurrency=CONCURRENCY,
            duration_s=LOAD_SECONDS, max_requests=200_000, summarise=summary_of,
        )
    )  # fmt: skip
    report_figure("load_c32_20s", result.summary())
    report_figure("load_p99_ms", f"{result.percentile(99) * 1e3:.1f}")
    assert result.errors == [], result.errors[:5]
    assert dict(result.statuses) == {200: len(result.samples)}
    assert len(result.samples) >= 500, result.summary()  # the loop really ran
    degraded = [s.info for s in result.ok if s.info["degraded"]]
    assert degraded == []
    assert all(len(s.info["items"]) == 10 for s in result.ok)
    # Every request is counted once in the metrics aggregated over both workers.
    after = metric_value(service.metrics(), "mtrank_requests_total", {"status": "200"})
    assert after - before == len(result.samples)
    assert result.percentile(99) < 5.0, result.summary()  # a gross regression, not a target


def test_exposure_counters_equal_returned_items_and_caps_hold(main_stack: Stack) -> None:
    """Two workers race on the same items; Redis counts each returned item exactly once.

    Demand (300 requests x 10 slots) exceeds the capacity (40 items x 25 + 10 items x 3), so
    every cap must be reached exactly and never passed.
    """
    scene_items = list(range(40))
    own_items = list(range(N_ITEMS - OWN_CAP_ITEMS, N_ITEMS))
    pool = [f"i{k}" for k in scene_items + own_items]
    caps = {f"i{k}": SCENE_CAP for k in scene_items} | {f"i{k}": OWN_CAP for k in own_items}
    client = main_stack.redis.client()
    today = datetime.now(UTC)
    days = sorted({utc_day(today - timedelta(minutes=5)), utc_day(today + timedelta(minutes=5))})
    keys = {item: [exposure_key(NAMESPACE, d, item) for d in days] for item in pool}
    client.delete(*[k for ks in keys.values() for k in ks])  # start from zero

    bodies = [
        orjson.dumps(
            {
                "user_id": f"u{u}",
                "candidates": [{"item_id": i} for i in pool],
                "size": 10,
                "scene": "capped",
            }
        )  # fmt: skip
        for u in range(10)
    ]
    result = asyncio.run(
        run_load(
            main_stack.service.port, cycle(bodies), concurrency=CONCURRENCY,
            duration_s=30.0, max_requests=300, summarise=summary_of,
        )
    )  # fmt: skip
    assert result.errors == []
    assert dict(result.statuses) == {200: 300}
    assert [s.info["degraded"] for s in result.ok if s.info["degraded"]] == []

    returned = Counter(item for s in result.ok for item in s.info["items"])
    counted = {item: sum(int(client.get(k) or 0) for k in ks) for item, ks in keys.items()}
    client.close()
    assert set(returned) <= set(pool)
    assert {i: returned.get(i, 0) for i in pool} == counted  # no lost or phantom increment
    over = {i: (returned[i], caps[i]) for i in pool if returned[i] > caps[i]}
    assert over == {}
    assert counted == caps  # demand > capacity: every cap reached exactly
