"""The dashboard and the alert rules, evaluated by a real Prometheus scraping the real service.

test_deploy_configs.py proves every expression parses and names only exported metrics. That
still leaves the failure that matters in an incident: a panel that shows "No data" because its
query does not match what the service really exposes (a label that is never set, a histogram
read without its ``_bucket`` suffix, a counter series that never appears). So this test runs
the whole chain on loopback:

- ``mtrank serve --workers 2`` on the model the training pipeline exported (``trained_world``),
  reading its snapshot from Redis under a private namespace, with an admin token;
- a second ranker whose Redis URL points at a closed port: it serves degraded responses and
  reports the store down (a real fault, not a mocked metric);
- ``prometheus`` on its own port scraping both every second and loading
  ``docker/prometheus/alerts.yml`` as it is in the repository;
- a short bounded load: explained requests, unknown users and items, invalid bodies, the
  ``home`` scene (diversity), items whose daily exposure cap is used up, admin reloads (one
  accepted, one rejected for a broken ranking config).

Then every dashboard query must return data, every alert expression must evaluate and every
metric an alert reads must have series, and the alerts whose fault was injected must evaluate
to the right replica. A query on a metric the service does not export fails the same checks
(shown on a mutated copy of the dashboard).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import math
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import redis
import yaml

from harness.load import LoadResult, run_load
from harness.processes import ServiceProcess, http_post, wait_until
from harness.trained import TrainedWorld
from mtrank.snapshot import exposure_key
from mtrank.snapshot_loader import load_snapshot_to_redis
from service.features.store import utc_day
from service.settings import DEFAULT_RANKING_CONFIG
from tests.support import REDIS_URL
from tests.support.promql import alert_exprs, dashboard_queries, metric_references
from tests.support.servers_prom import PromAPI, PrometheusProcess, scrape_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "mtrank.json"
ALERTS = ROOT / "docker" / "prometheus" / "alerts.yml"
ADMIN_TOKEN = "prom-live-admin-token-0123456789"
LOAD_REQUESTS = 480  # bounded by count and by LOAD_SECONDS, whichever comes first
LOAD_SECONDS = 10.0
# A fast ranker answers all LOAD_REQUESTS within one 1 s scrape, and a rate needs the traffic
# to span several: each connection pauses between requests (3 x 160 requests x 25 ms >= 4 s).
THINK_S = 0.025
DEGRADED_REQUESTS = 12
EVENT_BATCHES = 12  # POST /events batches to the healthy ranker, spread over the load
N_CAPPED = 4  # items whose exposure counter is pre-set far above any cap
INGEST_TIMEOUT_S = 30.0  # generous: other people's benchmarks share the 2 cores

Body = Callable[[int], bytes]


# ------------------------------------------------------------------------------ checks
def empty_queries(api: PromAPI, queries: list[tuple[str, str]]) -> list[str]:
    """``"panel: expr"`` for every query that errors or returns no series (empty: all good).

    This is the dashboard check itself, kept separate so the test can show it catches a
    query on a metric that does not exist.
    """
    problems = []
    for where, expr in queries:
        try:
            if not api.query(expr):
                problems.append(f"{where}: no data for {expr}")
        except RuntimeError as e:
            problems.append(f"{where}: {e}")
    return problems


def missing_series(api: PromAPI, exprs: list[tuple[str, str]]) -> list[str]:
    """``"alert: name"`` for each series name an expression reads that Prometheus has none of.

    Names are checked as written (``..._bucket`` for a histogram), which is what the query
    engine looks up; a bare histogram family name has no series and is reported.
    """
    problems = []
    for where, expr in exprs:
        for name in sorted(set(metric_references(expr))):
            if api.series_count(name) == 0:
                problems.append(f"{where}: no series named {name}")
    return problems


def strip_comparison(expr: str) -> str:
    """The expression without its trailing threshold (``... > 0.01`` -> ``...``).

    Alert expressions are conditions and are rightly empty on a healthy system; what they
    compare must still evaluate to data.
    """
    return re.sub(r"\s*(==|!=|>=|<=|>|<)\s*[0-9.eE+-]+\s*$", "", expr.strip())


def with_five_xx_as_four_xx(expr: str) -> str:
    return expr.replace('status=~"5.."', 'status=~"4.."')


def by_role(result: list[dict[str, Any]]) -> dict[str, float]:
    return {s["metric"].get("role", ""): float(s["value"][1]) for s in result}


# ------------------------------------------------------------------------------ fixtures
def closed_port() -> int:
    """A loopback port nothing listens on (bound and released; nobody else takes it in time)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def namespace(trained_world: TrainedWorld) -> Iterator[tuple[str, list[str]]]:
    """The snapshot loaded under a unique namespace on the shared Redis, plus the ids of
    ``N_CAPPED`` items whose exposure counters (today and tomorrow, UTC) are far over any cap.
    Every key of the namespace is deleted afterwards."""
    ns = f"promlive-{int(time.time() * 1000)}-{np.random.default_rng().integers(1 << 30)}"
    client = redis.Redis.from_url(REDIS_URL)
    capped = [str(i) for i in trained_world.snapshot.item_ids[-N_CAPPED:]]
    try:
        load_snapshot_to_redis(client, ns, trained_world.snapshot)
        now = datetime.now(UTC)
        for day in {utc_day(now), utc_day(now + timedelta(days=1))}:  # a run across midnight
            for item in capped:
                client.set(exposure_key(ns, day, item), 10**9, ex=3 * 86400)
        yield ns, capped
    finally:
        keys = list(client.scan_iter(match=f"mtrank:{ns}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
        client.close()


@pytest.fixture()
def ranking_config(tmp_path: Path) -> Path:
    """A private copy of the shipped ranking config, so a reload can be fed a broken one, with an
    experiment (the control and an arm using the home scene's rules) and a shadow of the served
    version, so the per-arm and shadow panels have series."""
    path = tmp_path / "ranking.yaml"
    shutil.copyfile(DEFAULT_RANKING_CONFIG, path)
    with path.open("a") as fh:
        fh.write(EXPERIMENTS_YAML)
    return path


EXPERIMENTS_YAML = """
experiments:
  - name: rules_test
    arms:
      - {name: control, bp: 5000}
      - {name: home_rules, bp: 5000, scene: home}
shadows:
  - {name: same_version, models: [ecommerce], sample_bp: 10000, timeout_ms: 1000}
"""


def ranker_env(world: TrainedWorld, redis_url: str, ns: str, config: Path) -> dict[str, str]:
    return {
        "MTRANK_MODEL_DIR": str(world.root),
        "MTRANK_MODEL_NAMES": "ecommerce",
        "MTRANK_REDIS_URL": redis_url,
        "MTRANK_FEATURE_NAMESPACE": ns,
        "MTRANK_RANKING_CONFIG": str(config),
        "MTRANK_ADMIN_TOKEN": ADMIN_TOKEN,
        "MTRANK_CONFIG_POLL_SECONDS": "0",  # reloads counted here come from /admin/reload only
        "MTRANK_REDIS_TIMEOUT_MS": "200",
    }


@pytest.fixture()
def rankers(
    trained_world: TrainedWorld, namespace: tuple[str, list[str]], ranking_config: Path
) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    """(healthy ranker with 2 workers, degraded ranker with 1 worker and no Redis)."""
    ns, _ = namespace
    served_log = {"MTRANK_SERVED_LOG_DIR": str(ranking_config.parent / "served"),
                  "MTRANK_SERVED_LOG_SAMPLE": "1", "MTRANK_SERVED_LOG_FLUSH_S": "1"}  # fmt: skip
    healthy = ServiceProcess(
        {**ranker_env(trained_world, REDIS_URL, ns, ranking_config), **served_log}, workers=2
    )
    dead_redis = f"redis://127.0.0.1:{closed_port()}/0"
    degraded = ServiceProcess(ranker_env(trained_world, dead_redis, ns, ranking_config), workers=1)
    with contextlib.ExitStack() as stack:
        stack.enter_context(healthy)
        # Not ready by design (its store is down): wait until it answers at all.
        degraded.start(require_ready=False)
        stack.callback(shutil.rmtree, degraded.log_path.parent, True)
        stack.callback(degraded.stop)
        yield healthy, degraded


@pytest.fixture()
def prometheus(rankers: tuple[ServiceProcess, ServiceProcess]) -> Iterator[PrometheusProcess]:
    healthy, degraded = rankers
    targets = {"healthy": [f"127.0.0.1:{healthy.port}"], "degraded": [f"127.0.0.1:{degraded.port}"]}
    with PrometheusProcess(scrape_config(targets, [ALERTS], interval_s=1.0)) as prom:
        yield prom


# ------------------------------------------------------------------------------ traffic
def request_mix(world: TrainedWorld, capped: list[str]) -> tuple[Body, Callable[[int], int]]:
    """``make_body(k)`` cycling through the request kinds, and the status each kind expects."""
    users = [str(u) for u in world.snapshot.user_ids[:50]]
    items = [str(i) for i in world.snapshot.item_ids[:-N_CAPPED]]
    rng = np.random.default_rng(5)

    def candidates(k: int, n: int) -> list[dict[str, Any]]:
        picks = rng.choice(len(items), size=min(n, len(items)), replace=False)
        return [{"item_id": items[i]} for i in picks.tolist()]

    def body(k: int) -> bytes:
        kind = k % 10
        user = users[k % len(users)]
        req: dict[str, Any] = {"user_id": user, "candidates": candidates(k, 40), "size": 10}
        if kind <= 3:  # the common case, explained
            req["explain"] = True
        elif kind == 4:  # unknown user and some unknown items: feature misses
            req["user_id"] = f"nobody-{k}"
            req["candidates"] += [{"item_id": f"ghost-{k}-{j}"} for j in range(5)]
        elif kind in (5, 6):  # the home scene: stronger diversity
            req["scene"] = "home"
        elif kind == 7:  # items at their exposure cap: dropped by the rule
            req["candidates"] += [{"item_id": i} for i in capped]
            req["explain"] = True
        elif kind == 8:  # invalid: size 0
            req["size"] = 0
        else:  # invalid: a scene the config does not have
            req["scene"] = "no-such-scene"
        return orjson.dumps(req)

    return body, lambda k: 422 if k % 10 >= 8 else 200


def admin_reloads(base_url: str, config: Path, broken_only: bool = False) -> list[int]:
    """Accepted reload, reload of a broken config (rejected, old one keeps serving), restore.

    ``broken_only``: just the rejected reload (the file is restored all the same).
    """
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    statuses = [] if broken_only else [http_post(base_url + "/admin/reload", b"", auth)[0]]
    good = config.read_text()
    config.write_text(good + "\nnot_a_key: 1\n")  # unknown top-level key: config rejected
    try:
        statuses.append(http_post(base_url + "/admin/reload", b"", auth)[0])
    finally:
        config.write_text(good)
    if not broken_only:
        statuses.append(http_post(base_url + "/admin/reload", b"", auth)[0])
    return statuses


def event_traffic(base_url: str, stop: threading.Event) -> list[int]:
    """Small event batches to the healthy ranker over the load (so the events panel has rates);
    each batch holds one event twice over two sends (a duplicate) and a made-up request id (an
    orphan)."""
    statuses = []
    for k in range(EVENT_BATCHES):
        batch = [{"event_id": f"live-{k}-{j}", "type": kind, "request_id": f"unknown-{k}",
                  "user_id": "1", "item_id": "1000001", "ts": time.time() - 5}
                 for j, kind in enumerate(("impression", "click", "cart", "collect"))]  # fmt: skip
        for _ in range(2):  # the second send: every event a duplicate
            statuses.append(http_post(base_url + "/events", orjson.dumps({"events": batch}))[0])
        if stop.wait(LOAD_SECONDS / EVENT_BATCHES):
            break
    return statuses


def degraded_traffic(base_url: str, body: Body, stop: threading.Event) -> list[dict[str, Any]]:
    """Requests to the Redis-less ranker, spread over the load so rates see several scrapes."""
    out = []
    for k in range(DEGRADED_REQUESTS):
        status, raw = http_post(base_url + "/rank", body(k * 10))  # kind 0: a valid request
        out.append({"status": status, **orjson.loads(raw)})
        if stop.wait(LOAD_SECONDS / DEGRADED_REQUESTS):
            break
    return out


# ------------------------------------------------------------------------------ phases
def wait_or_fail(check: Callable[[], bool], why: Callable[[], str]) -> None:
    """Poll ``check`` for up to INGEST_TIMEOUT_S; on time-out fail with ``why()``."""
    try:
        wait_until(check, INGEST_TIMEOUT_S, 0.25)
    except TimeoutError:
        pytest.fail(why())


def drive_traffic(
    world: TrainedWorld,
    capped: list[str],
    healthy: ServiceProcess,
    degraded: ServiceProcess,
    config: Path,
) -> tuple[LoadResult, list[int], list[dict[str, Any]]]:
    """The bounded load on the healthy ranker; meanwhile admin reloads and degraded requests.

    Checks what the client saw: each kind of request got its expected status, the reloads
    were accepted / rejected / accepted, and every degraded answer names its reason.
    """
    body, expected_status = request_mix(world, capped)
    done = threading.Event()
    side: dict[str, Any] = {}

    def side_traffic() -> None:
        side["reloads"] = admin_reloads(healthy.base_url, config)
        side["degraded"] = degraded_traffic(degraded.base_url, body, done)

    def events() -> None:
        side["events"] = event_traffic(healthy.base_url, done)

    worker = threading.Thread(target=side_traffic, name="side-traffic")
    worker.start()
    eventer = threading.Thread(target=events, name="event-traffic")
    eventer.start()
    try:
        load = asyncio.run(
            run_load(
                healthy.port, body, concurrency=3, max_requests=LOAD_REQUESTS,
                duration_s=LOAD_SECONDS, request_timeout_s=20.0, think_s=THINK_S,
            )
        )  # fmt: skip
    finally:
        done.set()
        worker.join(60)
        eventer.join(60)
    assert not worker.is_alive() and not eventer.is_alive()
    assert side["events"] and set(side["events"]) == {200}, side["events"]
    assert not load.errors, load.errors[:3]
    assert len(load.samples) >= 100, load.summary()
    # run_load hands out k = 0, 1, 2 ... so the kinds sent follow from the count.
    expected = {200: 0, 422: 0}
    for k in range(len(load.samples)):
        expected[expected_status(k)] += 1
    assert dict(load.statuses) == expected, load.summary()
    assert side["reloads"] == [200, 409, 200], side["reloads"]
    answers: list[dict[str, Any]] = side["degraded"]
    assert answers and all(a["status"] == 200 for a in answers)
    assert all("feature_store_unavailable" in a["degraded"] for a in answers), answers[0]
    return load, side["reloads"], answers


def check_dashboard(api: PromAPI, traffic: tuple[float, float]) -> list[tuple[str, str]]:
    """Every panel query returns data; returns the 5xx-share queries (checked apart).

    The share queries are rates over the last minute: on a loaded machine the checks before them
    can outlast that minute, so they are evaluated over the traffic's own time span (``traffic``,
    unix seconds) rather than at "now".
    """
    queries = dashboard_queries(DASHBOARD)
    assert len(queries) >= 12
    five_xx = [(w, e) for w, e in queries if 'status=~"5.."' in e]
    plain = [(w, e) for w, e in queries if (w, e) not in five_xx]
    problems: list[str] = []

    def all_panels_have_data() -> bool:
        problems[:] = empty_queries(api, plain)
        return not problems

    # A series born late (e.g. the failure counter of the rejected reload) needs a second
    # scrape before rate()/increase() see it: poll.
    with contextlib.suppress(TimeoutError):
        wait_until(all_panels_have_data, INGEST_TIMEOUT_S, 0.5)
    assert not problems, "\n".join(problems)
    # The 5xx share divides an empty vector when nothing failed (no 5xx series exist: the
    # service answered none, checked here) so it is rightly empty on this run; the same
    # expression on the 4xx we did send must give the 422 share, which proves its shape.
    assert api.query('mtrank_requests_total{status=~"5.."}') == []
    for where, expr in five_xx:
        four_xx = with_five_xx_as_four_xx(expr)
        shares = [v for v in api.values_between(four_xx, *traffic) if math.isfinite(v)]
        assert shares, f"{where}: no data for {four_xx}"
        share = float(np.median(shares))
        assert 0.05 < share < 0.5, f"{where}: 4xx share {share} (about 0.2 was sent)"

    # Values, not just presence: these panels show what the run did.
    dropped = api.query("sum by (reason) (rate(mtrank_items_dropped_total[1m]))")
    assert {s["metric"]["reason"] for s in dropped} >= {"exposure_cap"}
    effects = api.query("sum by (rule) (rate(mtrank_rule_effects_total[1m]))")
    assert "diversity_moved" in {s["metric"]["rule"] for s in effects}, effects
    misses = api.query(
        "sum by (entity) (rate(mtrank_feature_misses_total[1m]))"
        " / sum by (entity) (rate(mtrank_feature_lookups_total[1m]))"
    )
    miss_rate = {s["metric"]["entity"]: float(s["value"][1]) for s in misses}
    assert 0.0 < miss_rate["user"] < 0.5 and 0.0 < miss_rate["item"] < 0.5, miss_rate
    return five_xx


def check_alert_exprs(
    api: PromAPI, alerts: dict[str, str], healthy: ServiceProcess, config: Path
) -> None:
    """Every alert expression evaluates and reads existing series; the injected faults trip
    the right conditions on the right replica."""
    for expr in alerts.values():
        api.query(expr)  # raises on an evaluation error
    missing = missing_series(api, list(alerts.items()))
    assert not missing, "\n".join(missing)
    for name, expr in alerts.items():
        inner = strip_comparison(expr)
        if inner != expr and 'status=~"5.."' not in inner:
            assert api.query(inner), f"{name}: no data for {inner}"

    store_down = api.query(alerts["MtrankFeatureStoreDown"])
    assert [s["metric"]["role"] for s in store_down] == ["degraded"], store_down
    degraded_rate = api.query(alerts["MtrankDegradedResponses"])
    assert "feature_store_unavailable" in {s["metric"]["reason"] for s in degraded_rate}
    assert api.query(alerts["MtrankNoModelLoaded"]) == []  # both serve a model
    assert api.query(alerts["MtrankTargetDown"]) == []
    assert api.query(alerts["MtrankHighErrorRate"]) == []  # no 5xx were served
    p99 = api.query(strip_comparison(alerts["MtrankLatencyP99OverBudget"]))
    assert 0.0 < float(p99[0]["value"][1]) < 10.0, p99

    # MtrankModelReloadFailed: the service creates {result="failure"} at 0 up front, so the one
    # rejected reload of admin_reloads() trips the alert (increase() sees 0 -> 1), on the
    # healthy replica only.
    reload_failed = alerts["MtrankModelReloadFailed"]
    healthy_at = f"127.0.0.1:{healthy.port}"  # the rule sums `by (instance)`
    wait_or_fail(
        lambda: [s["metric"]["instance"] for s in api.query(reload_failed)] == [healthy_at],
        lambda: f"{reload_failed} -> {api.query(strip_comparison(reload_failed))}",
    )

    def reload_counts() -> dict[str, float]:
        reloads = api.query('sum by (result) (mtrank_model_reloads_total{role="healthy"})')
        return {s["metric"]["result"]: float(s["value"][1]) for s in reloads}

    # Each of the 2 workers loaded the model at start, 2 admin reloads accepted, 1 rejected.
    wait_or_fail(
        lambda: reload_counts() == {"success": 4.0, "failure": 1.0},
        lambda: f"reload counts {reload_counts()}",
    )


def check_rules_and_targets(api: PromAPI, alerts: dict[str, str]) -> None:
    """Every group of alerts.yml loaded, every rule evaluates cleanly, states match the faults,
    and both ranker targets are up."""
    file_groups = {g["name"] for g in yaml.safe_load(ALERTS.read_text())["groups"]}
    state: dict[str, str] = {}

    def settled() -> bool:
        groups = api.rule_groups()
        rules = [r for g in groups for r in g["rules"]]
        state.clear()
        state.update({r["name"]: f"{r['state']}/{r['health']}" for r in rules})
        return (
            {g["name"] for g in groups} == file_groups
            and {r["name"] for r in rules if r["type"] == "alerting"} == set(alerts)
            and all(r["health"] == "ok" for r in rules)
            and state["MtrankFeatureStoreDown"] in {"pending/ok", "firing/ok"}  # for: 1m
            and state["MtrankModelReloadFailed"] == "firing/ok"  # no `for:`
            and state["MtrankNoModelLoaded"] == "inactive/ok"
            and state["MtrankHighErrorRate"] == "inactive/ok"
        )

    wait_or_fail(settled, lambda: f"rule states: {state}")
    targets = [t for t in api.active_targets() if t["labels"]["job"] == "mtrank"]
    assert sorted(t["labels"]["role"] for t in targets) == ["degraded", "healthy"]
    assert all(t["health"] == "up" and not t["lastError"] for t in targets), targets


def check_the_checks_can_fail(api: PromAPI, five_xx: list[tuple[str, str]], scratch: Path) -> None:
    """A panel on a metric the service does not export is reported, and so is an alert on one
    (and a histogram read by its family name, which has no series)."""
    fake = json.loads(DASHBOARD.read_text())
    bogus = copy.deepcopy(fake["panels"][-1])
    bogus.update(id=10_000, title="Made-up metric")
    bogus["targets"] = [{**bogus["targets"][0], "expr": "sum(rate(mtrank_made_up_total[1m]))"}]
    fake["panels"].append(bogus)
    fake_path = scratch / "dashboard-with-made-up-metric.json"
    fake_path.write_text(json.dumps(fake))
    fake_queries = [q for q in dashboard_queries(fake_path) if q not in five_xx]
    assert [p.split(":")[0] for p in empty_queries(api, fake_queries)] == ["Made-up metric"]
    made_up = [("MadeUp", "sum(rate(mtrank_made_up_total[5m])) > 0")]
    assert missing_series(api, made_up) == ["MadeUp: no series named mtrank_made_up_total"]
    assert missing_series(api, [("Bare", "mtrank_request_stage_seconds")])


# ------------------------------------------------------------------------------ the test
def test_dashboard_and_alerts_on_live_prometheus(
    trained_world: TrainedWorld,
    namespace: tuple[str, list[str]],
    ranking_config: Path,
    rankers: tuple[ServiceProcess, ServiceProcess],
    prometheus: PrometheusProcess,
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    healthy, degraded = rankers
    api = prometheus.api

    # Both replicas scraped before any traffic: counters start from a scraped baseline.
    wait_or_fail(
        lambda: by_role(api.query('up{job="mtrank"}')) == {"healthy": 1.0, "degraded": 1.0},
        lambda: f"targets: {api.active_targets()}\n{prometheus.log_text()[-2000:]}",
    )
    traffic_start = time.time()
    load, _, answers = drive_traffic(trained_world, namespace[1], healthy, degraded,
                                     ranking_config)  # fmt: skip

    # Ingestion: Prometheus' sums equal what the client counted, per replica (both workers of
    # the healthy one aggregated by the multiprocess collector).
    want = {"healthy": float(len(load.samples)), "degraded": float(len(answers))}
    sums = "sum by (role) (mtrank_requests_total)"
    wait_or_fail(
        lambda: by_role(api.query(sums)) == want,
        lambda: f"Prometheus counts {by_role(api.query(sums))}, the client sent {want}",
    )
    traffic_end = time.time()  # every request of the run is scraped by now
    five_xx = check_dashboard(api, (traffic_start, traffic_end))
    alerts = dict(alert_exprs(ALERTS))
    check_alert_exprs(api, alerts, healthy, ranking_config)
    check_rules_and_targets(api, alerts)
    check_the_checks_can_fail(api, five_xx, tmp_path)
    # Test body only (fixtures excluded): bounded well under a minute even on a busy box.
    assert time.monotonic() - started < 90


def test_strip_comparison() -> None:
    assert strip_comparison("sum(rate(x[5m])) > 0") == "sum(rate(x[5m]))"
    assert strip_comparison("a\n  / b\n  > 0.01\n") == "a\n  / b"
    assert strip_comparison("min(x) == 0") == "min(x)"
    assert strip_comparison("absent(x == 1)") == "absent(x == 1)"
    assert with_five_xx_as_four_xx('r{status=~"5.."}') == 'r{status=~"4.."}'
