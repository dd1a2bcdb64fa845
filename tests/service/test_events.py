"""POST /events on the real app and a real Redis: checks, dedup, orphans, stream, impression caps.

The world's snapshot is loaded into Redis under a namespace of the test (``redis_namespace``);
the events go to that namespace's stream, and impressions to its exposure counters.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import redis

from harness.processes import ServiceProcess, http_post
from mtrank.events import ENTRY_FIELD, stream_key
from mtrank.snapshot import exposure_key
from service.request_ids import RequestIds
from tests.service.conftest import RANKING_YAML, World, closed_port
from tests.support import REDIS_URL
from tests.support.app_client import AppClient

NOW = time.time()


def event(i: int, kind: str = "click", request_id: str = "r" * 32, **extra: Any) -> dict[str, Any]:
    ev = {"event_id": f"ev-{i}", "type": kind, "request_id": request_id, "user_id": "u1",
          "item_id": f"i{i % 10}", "ts": NOW - 10}  # fmt: skip
    if kind == "purchase":
        ev["amount"] = 19.9
    if kind == "stay":
        ev["seconds"] = 42.0
    return {**ev, **extra}


@pytest.fixture
def conn() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


@pytest.fixture
def app(client_for: Callable[..., AppClient], redis_namespace: str) -> AppClient:
    return client_for(redis_url=REDIS_URL, feature_namespace=redis_namespace)


def entries(conn: redis.Redis, ns: str) -> list[dict[str, Any]]:
    return [json.loads(f[ENTRY_FIELD]) for _, f in conn.xrange(stream_key(ns))]


def test_a_batch_is_appended_to_the_stream_with_every_field(
    app: AppClient, conn: redis.Redis, redis_namespace: str
) -> None:
    batch = [event(0, "impression"), event(1, "click"), event(2, "purchase"), event(3, "stay"),
             event(4, "cart"), event(5, "collect")]  # fmt: skip
    r = app.post("/events", json={"events": batch})
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 6, "duplicates": 0, "orphans": 6}
    stored = entries(conn, redis_namespace)
    assert [e["event_id"] for e in stored] == [f"ev-{i}" for i in range(6)]
    assert stored[2]["amount"] == 19.9 and stored[3]["seconds"] == 42.0
    assert "amount" not in stored[0]
    assert all(e["orphan"] for e in stored)  # "rrr..." was never minted by the service
    assert abs(stored[0]["received"] - time.time()) < 60
    metrics = app.get("/metrics").text
    assert 'mtrank_events_total{result="accepted",type="purchase"} 1.0' in metrics


def test_a_retried_batch_is_counted_once(
    app: AppClient, conn: redis.Redis, redis_namespace: str
) -> None:
    batch = {"events": [event(i) for i in range(50)]}
    assert app.post("/events", json=batch).json()["accepted"] == 50
    again = app.post("/events", json=batch).json()
    assert again == {"accepted": 0, "duplicates": 50, "orphans": 0}
    partly = {"events": [event(i) for i in range(40, 60)]}  # 10 old, 10 new
    assert app.post("/events", json=partly).json()["accepted"] == 10
    assert conn.xlen(stream_key(redis_namespace)) == 60
    metrics = app.get("/metrics").text
    assert 'mtrank_events_total{result="duplicate",type="click"} 60.0' in metrics


def test_events_of_a_served_request_are_not_orphans(
    app: AppClient, conn: redis.Redis, redis_namespace: str
) -> None:
    ranked = app.post("/rank", json={"user_id": "u1", "candidates": [{"item_id": "i1"}]}).json()
    rid = ranked["request_id"]
    r = app.post("/events", json={"events": [event(0, request_id=rid),
                                             event(1, request_id="0" * 32)]})  # fmt: skip
    assert r.json() == {"accepted": 2, "duplicates": 0, "orphans": 1}
    assert [e["orphan"] for e in entries(conn, redis_namespace)] == [False, True]


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"type": "view"}, "events[1].type"),
        ({"event_id": "has space"}, "events[1].event_id"),
        ({"request_id": ""}, "events[1].request_id"),
        ({"item_id": ""}, "events[1].item_id"),
        ({"ts": NOW + 3600}, "events[1].ts"),
        ({"ts": -1}, "events[1].ts"),
        ({"surprise": 1}, "events[1]"),
    ],
)
def test_a_bad_event_is_a_422_naming_it_and_nothing_is_kept(
    app: AppClient, conn: redis.Redis, redis_namespace: str, bad: dict[str, Any], field: str
) -> None:
    r = app.post("/events", json={"events": [event(0), event(1, **bad)]})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"].startswith(field), r.json()
    assert conn.xlen(stream_key(redis_namespace)) == 0


def test_purchase_needs_an_amount_and_stay_needs_seconds(app: AppClient) -> None:
    ev = event(0, "purchase")
    del ev["amount"]
    r = app.post("/events", json={"events": [ev]})
    assert (r.status_code, r.json()["error"]["field"]) == (422, "events[0].amount")
    ev = event(0, "stay")
    del ev["seconds"]
    r = app.post("/events", json={"events": [ev]})
    assert (r.status_code, r.json()["error"]["field"]) == (422, "events[0].seconds")


def test_batch_size_and_body_are_checked(client_for: Callable[..., AppClient],
                                         redis_namespace: str) -> None:  # fmt: skip
    app = client_for(redis_url=REDIS_URL, feature_namespace=redis_namespace, events_max_batch=5)
    r = app.post("/events", json={"events": [event(i) for i in range(6)]})
    assert (r.status_code, r.json()["error"]["field"]) == (422, "events")
    assert app.post("/events", json={"events": []}).status_code == 422
    assert app.post("/events", content=b"{not json").status_code == 422


def test_redis_down_is_a_503_with_retry_after_and_rank_still_answers(
    client_for: Callable[..., AppClient],
) -> None:
    app = client_for(redis_url=f"redis://127.0.0.1:{closed_port()}/0", events_timeout_ms=200)
    r = app.post("/events", json={"events": [event(0)]})
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "events_unavailable"
    ranked = app.post("/rank", json={"user_id": "u1", "candidates": [{"item_id": "i1"}]})
    assert ranked.status_code == 200
    assert "feature_store_unavailable" in ranked.json()["degraded"]  # served from defaults


def test_without_redis_events_are_off(client: AppClient) -> None:
    r = client.post("/events", json={"events": [event(0)]})
    assert r.status_code == 503
    assert "MTRANK_REDIS_URL" in r.json()["error"]["message"]


def test_request_ids_prove_their_origin() -> None:
    ids = RequestIds(b"k" * 32)
    rid = ids.mint()
    assert len(rid) == 32 and ids.known(rid)
    assert not RequestIds(b"x" * 32).known(rid)  # another key
    assert not ids.known(rid[:-1] + ("0" if rid[-1] != "0" else "1"))
    assert not ids.known("not-hex-at-all-not-hex-at-all-xx")
    assert RequestIds.derived("a", "b").known(RequestIds.derived("a", "b").mint())


# ------------------------------------------------------------------ caps from impressions
IMPRESSION_CAPS = RANKING_YAML.replace(
    "      exposure_cap: {enabled: true, default_daily_cap: 1000}",
    "      exposure_cap: {enabled: true, default_daily_cap: 2, count_on: impression}",
).replace(
    "      exposure_cap: {enabled: true, default_daily_cap: 1}",
    "      exposure_cap: {enabled: true, default_daily_cap: 1, count_on: impression}",
)


def impression_config(world: World) -> str:
    doc = IMPRESSION_CAPS
    for scene in ("diverse:\n",):  # scenes without their own exposure_cap take the defaults
        doc = doc.replace(
            f"  {scene}    rules:\n",
            f"  {scene}    rules:\n      exposure_cap: {{count_on: impression}}\n",
        )
    path = world.root / "ranking-impressions.yaml"
    path.write_text(doc)
    return str(path)


def today_ts() -> float:
    return datetime.now(UTC).timestamp() - 1


def test_impressions_count_against_caps_and_serving_does_not(
    world: World, client_for: Callable[..., AppClient], conn: redis.Redis, redis_namespace: str
) -> None:
    app = client_for(redis_url=REDIS_URL, feature_namespace=redis_namespace,
                     ranking_config=impression_config(world))  # fmt: skip
    body = {"user_id": "u1", "candidates": [{"item_id": "i3"}, {"item_id": "i4"}]}
    for _ in range(3):  # served three times: nothing counted in this mode
        assert {it["item_id"] for it in app.post("/rank", json=body).json()["items"]} == {
            "i3", "i4"}  # fmt: skip
    day = datetime.now(UTC).strftime("%Y%m%d")
    assert conn.get(exposure_key(redis_namespace, day, "i3")) is None
    shown = [event(k, "impression", item_id="i3", ts=today_ts()) for k in range(2)]
    assert app.post("/events", json={"events": shown}).json()["accepted"] == 2
    assert int(conn.get(exposure_key(redis_namespace, day, "i3"))) == 2
    items = [it["item_id"] for it in app.post("/rank", json=body).json()["items"]]
    assert items == ["i4"]  # i3 reached its cap of 2 impressions
    # a retried impression batch does not count twice
    app.post("/events", json={"events": shown})
    assert int(conn.get(exposure_key(redis_namespace, day, "i3"))) == 2


def test_mixed_counting_modes_are_refused(world: World, tmp_path: Any) -> None:
    from service.ranking_config import RankingConfigError, load_ranking_config

    path = tmp_path / "r.yaml"
    path.write_text(RANKING_YAML.replace(
        "      exposure_cap: {enabled: true, default_daily_cap: 1}",
        "      exposure_cap: {enabled: true, default_daily_cap: 1, count_on: impression}",
    ))  # fmt: skip
    with pytest.raises(RankingConfigError, match="scenes.capped.rules.exposure_cap.count_on"):
        load_ranking_config(path, {"ctr", "cvr"})


def service_env(world: World, ns: str, config: str) -> dict[str, str]:
    return {
        "MTRANK_MODEL_DIR": str(world.root), "MTRANK_MODEL_NAMES": "ecommerce",
        "MTRANK_REDIS_URL": REDIS_URL, "MTRANK_FEATURE_NAMESPACE": ns,
        "MTRANK_RANKING_CONFIG": config, "MTRANK_RELOAD_POLL_SECONDS": "0",
        "MTRANK_CONFIG_POLL_SECONDS": "0", "MTRANK_REDIS_TIMEOUT_MS": "500",
    }  # fmt: skip


def test_impression_caps_hold_across_two_worker_processes(
    world: World, conn: redis.Redis, redis_namespace: str
) -> None:
    env = service_env(world, redis_namespace, impression_config(world))
    body = json.dumps({"user_id": "u2", "candidates": [{"item_id": f"i{k}"} for k in range(6)],
                       "size": 6}).encode()  # fmt: skip
    with ServiceProcess(env, workers=2) as svc:
        for k, item in enumerate(("i0", "i1")):  # each shown twice, through either worker
            for n in range(2):
                ev = event(10 * k + n, "impression", item_id=item, ts=today_ts())
                status, raw = http_post(f"{svc.base_url}/events", json.dumps(
                    {"events": [ev]}).encode())  # fmt: skip
                assert status == 200, raw
        for _ in range(12):  # new connection each time: both workers answer
            status, raw = http_post(f"{svc.base_url}/rank", body)
            assert status == 200, raw
            items = {it["item_id"] for it in json.loads(raw)["items"]}
            assert items == {"i2", "i3", "i4", "i5"}


def test_acknowledged_events_survive_a_killed_service(
    world: World, conn: redis.Redis, redis_namespace: str
) -> None:
    env = service_env(world, redis_namespace, str(world.ranking_path))
    svc = ServiceProcess(env, workers=1)
    svc.start()
    try:
        batch = json.dumps({"events": [event(i) for i in range(100)]}).encode()
        status, raw = http_post(f"{svc.base_url}/events", batch)
        assert (status, json.loads(raw)["accepted"]) == (200, 100)
        svc.signal(signal.SIGKILL)  # one worker: the serving process itself, no shutdown at all
        svc.wait(10)
    finally:
        svc.stop()
    assert [e["event_id"] for e in entries(conn, redis_namespace)] == [
        f"ev-{i}" for i in range(100)
    ]
