"""Shadow models: measured after the response, never changing or delaying it, whatever they do.

The shadow is another exported version of the served model (same features, other weights),
scored in the service's shadow process. Its faults are real: a version whose graph is broken
after the config loaded (the shadow process fails to load it), a shadow process stopped with
SIGSTOP (a hang) or killed with SIGKILL (a crash).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import pytest

from mtrank.registry import ModelVersion
from service.shadow import HANG_AFTER_S, ShadowRunner, kendall_tau_b
from tests.service.conftest import World
from tests.service.test_experiments import _doc, rank_body, scores_of
from tests.support.app_client import AppClient
from tests.support.exported import ExportedModels


def tau_reference(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b from its definition, pair by pair."""
    conc = disc = tx = ty = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        a, b = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        tx += a != 0
        ty += b != 0
        conc += a * b > 0
        disc += a * b < 0
    return float((conc - disc) / np.sqrt(tx * ty))


@pytest.mark.parametrize("seed", range(5))
def test_kendall_tau_b_matches_its_definition_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6, 25).astype(float)  # many ties
    y = x + rng.normal(0, 2, 25).round()
    assert kendall_tau_b(x, y) == pytest.approx(tau_reference(x.tolist(), y.tolist()))
    assert kendall_tau_b(x, x) == pytest.approx(1.0)
    assert kendall_tau_b(x, -x) == pytest.approx(-1.0)
    assert np.isnan(kendall_tau_b(x, np.ones(25)))


@pytest.fixture
def shadow_version(world: World, exported_models: ExportedModels) -> ModelVersion:
    return exported_models.publish(world.root, "ecommerce", alternate=True, promote=False)


def shadow_app(
    world: World, client_for: Callable[..., AppClient], version: str, **shadow: Any
) -> AppClient:
    """An app whose config shadows ``version``; returns once its shadow process is ready."""
    in_flight = shadow.pop("in_flight", 4)
    path = world.root / "ranking-shadow.yaml"
    spec = {"name": "next", "models": [f"ecommerce@{version}"], "log_sample_bp": 10_000,
            "timeout_ms": 5_000, **shadow}  # fmt: skip
    path.write_text(_doc(None, [spec]))
    client = client_for(ranking_config=path, shadow_max_in_flight=in_flight)
    client.post("/rank", json=rank_body("u7", 4))  # starts the shadow process (skipped: busy)
    assert runner(client).process.ready.wait(60), "the shadow process did not start"
    return client


def runner(client: AppClient) -> ShadowRunner:
    shadows = client.app.state.services.ranker.shadows
    assert shadows is not None
    return shadows


def metric(client: AppClient, line_start: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def runs(client: AppClient, result: str) -> float:
    return metric(client, f'mtrank_shadow_runs_total{{result="{result}",shadow="next"}}')


def test_a_shadow_is_measured_and_the_response_is_the_live_one(
    world: World, shadow_version: ModelVersion, client_for: Callable[..., AppClient],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    plain = client_for()
    client = shadow_app(world, client_for, shadow_version.version, top_k=8)
    caplog.set_level(logging.INFO, logger="mtrank.shadow")
    for user in ("u0", "u1", "u2", "u3", "u4"):
        live = client.post("/rank", json=rank_body(user, 12)).json()
        assert live["models"][0]["version"] == world.model.version
        reference = plain.post("/rank", json=rank_body(user, 12)).json()
        assert [it["item_id"] for it in live["items"]] == [
            it["item_id"] for it in reference["items"]
        ]
        assert scores_of(live) == pytest.approx(scores_of(reference))
        client.portal.call(runner(client).drain)  # one at a time: none skipped as busy
    assert runs(client, "ok") == 5
    assert metric(client, 'mtrank_shadow_kendall_tau_count{shadow="next"}') == 5
    assert metric(client, 'mtrank_shadow_topk_overlap_count{shadow="next"}') == 5
    assert metric(client, 'mtrank_shadow_output_shift_count{shadow="next",task="ctr"}') == 5
    assert metric(client, 'mtrank_shadow_score_count{shadow="next",side="shadow"}') == 5 * 8
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "mtrank.shadow"
              and r.getMessage().startswith("{")]  # fmt: skip
    assert len(logged) == 5
    entry = logged[0]
    assert entry["models"] == {"ecommerce": shadow_version.version}
    assert len(entry["live_top"]) == 8 and len(entry["shadow_top"]) == 8
    assert -1.0 <= entry["kendall_tau"] <= 1.0


def test_a_shadow_of_the_live_version_agrees_perfectly(
    world: World, client_for: Callable[..., AppClient]
) -> None:
    """Same version, same fusion: tau 1 and full overlap (what rank agreement measures)."""
    client = shadow_app(world, client_for, world.model.version, top_k=6)
    client.post("/rank", json=rank_body("u2", 12))
    client.portal.call(runner(client).drain)
    assert metric(client, 'mtrank_shadow_kendall_tau_bucket{le="0.99",shadow="next"}') == 0
    assert metric(client, 'mtrank_shadow_kendall_tau_bucket{le="1.0",shadow="next"}') == 1
    assert metric(client, 'mtrank_shadow_topk_overlap_sum{shadow="next"}') == pytest.approx(1.0)


def test_a_shadow_that_fails_never_affects_the_response(
    world: World, exported_models: ExportedModels, client_for: Callable[..., AppClient]
) -> None:
    """The version's graph is truncated after the config loaded: the shadow process cannot
    load it, every shadow run is an error, every response is the live one."""
    broken = exported_models.publish(world.root, "ecommerce", alternate=True, promote=False)
    plain = client_for()
    client = shadow_app(world, client_for, broken.version)
    graph = broken.path / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    for user in ("u0", "u1", "u2"):
        r = client.post("/rank", json=rank_body(user))
        assert r.status_code == 200
        assert scores_of(r.json()) == pytest.approx(
            scores_of(plain.post("/rank", json=rank_body(user)).json())
        )
        client.portal.call(runner(client).drain)
    assert runs(client, "error") == 3
    assert runs(client, "ok") == 0


def test_a_stopped_shadow_process_neither_delays_nor_queues_and_is_replaced(
    world: World, shadow_version: ModelVersion, client_for: Callable[..., AppClient]
) -> None:
    client = shadow_app(world, client_for, shadow_version.version, timeout_ms=200, in_flight=1)
    shadows = runner(client)
    old = shadows.process.pid
    assert old is not None
    os.kill(old, signal.SIGSTOP)  # a hang: alive, never answering
    try:
        started = time.perf_counter()
        for user in ("u0", "u1", "u2", "u3"):
            assert client.post("/rank", json=rank_body(user)).status_code == 200
        assert time.perf_counter() - started < 5  # none of the four waited for the shadow
        assert runs(client, "busy") >= 3  # the first holds the only slot: the rest skip
        client.portal.call(partial(shadows.drain, HANG_AFTER_S + 20))
        assert runs(client, "timeout") == 1
        assert shadows.process.pid != old  # killed and replaced
        assert shadows.process.ready.wait(60)
        client.post("/rank", json=rank_body("u5"))
        client.portal.call(shadows.drain)
        assert runs(client, "ok") == 1  # the new process answers
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old, signal.SIGKILL)


def test_a_killed_shadow_process_is_replaced(
    world: World, shadow_version: ModelVersion, client_for: Callable[..., AppClient]
) -> None:
    client = shadow_app(world, client_for, shadow_version.version)
    shadows = runner(client)
    old = shadows.process.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while shadows.process.pid == old and time.monotonic() < deadline:
        time.sleep(0.05)
    assert shadows.process.pid != old
    assert shadows.process.ready.wait(60)
    assert client.post("/rank", json=rank_body("u1")).status_code == 200
    client.portal.call(shadows.drain)
    assert runs(client, "ok") == 1


def test_sampling_shadows_about_its_share_of_requests(
    world: World, shadow_version: ModelVersion, client_for: Callable[..., AppClient]
) -> None:
    client = shadow_app(world, client_for, shadow_version.version, sample_bp=0)
    for user in ("u0", "u1", "u2"):
        client.post("/rank", json=rank_body(user))
    client.portal.call(runner(client).drain)
    assert runs(client, "ok") == 0
    assert runs(client, "busy") == 0  # not even sampled
