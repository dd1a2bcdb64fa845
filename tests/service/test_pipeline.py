"""The ranking pipeline's less common paths: request-time overrides, exposure races and refills,
shared caps across processes on Redis, hot reload of models and ranking config, and what each
timed stage holds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness.processes import metric_value
from mtrank.registry import Registry
from service.features.assemble import Assembler
from service.features.embedded import EmbeddedFeatureStore
from service.features.store import FetchResult
from service.metrics import STAGES
from service.settings import Settings
from tests.service.conftest import (
    ADMIN_TOKEN,
    ALPHA,
    BETA,
    BOOST,
    DEMOTE,
    LOW_QUALITY,
    RANKING_YAML,
    REDIS_URL,
    AppClient,
    World,
)
from tests.service.test_api import expected
from tests.support.exported import ExportedModels, onnx_outputs

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_price_override_reaches_the_model_and_the_formula(world: World, client: AppClient) -> None:
    cands = ["i1", "i2", "i3"]
    body = {"user_id": "u1", "candidates": [{"item_id": "i1"}, {"item_id": "i2", "price": 0.0},
            {"item_id": "i3", "price": 400.0}], "explain": True}  # fmt: skip
    items = {it["item_id"]: it for it in client.post("/rank", json=body).json()["items"]}
    snap, spec = world.snapshot, world.spec
    recs = snap.items[[list(snap.item_ids).index(i) for i in cands]].copy()
    asm = Assembler(spec)
    recs = asm.override_items(recs, {"price": np.array([np.nan, 0.0, 400.0])})
    user = snap.users[list(snap.user_ids).index("u1")]
    out = onnx_outputs(world.model, *asm.assemble(user, recs, None))
    weight = np.where(recs["promoted"] == 1, BOOST, 1.0) * np.where(
        recs["quality"] < LOW_QUALITY, DEMOTE, 1.0
    )
    score = out["ctr"] * (ALPHA + out["cvr"]) * (BETA + recs["price"]) * weight
    for k, item in enumerate(cands):
        assert items[item]["score"] == pytest.approx(score[k], rel=1e-5)
        assert items[item]["explain"]["predictions"]["ctr"] == pytest.approx(out["ctr"][k], 1e-5)
    assert items["i3"]["explain"]["factors"]["(beta + price)"] == pytest.approx(BETA + 400.0)
    assert items["i1"]["explain"]["factors"]["(beta + price)"] == pytest.approx(
        BETA + float(snap.items["price"][1]), rel=1e-6
    )


class RacingStore(EmbeddedFeatureStore):
    """The real embedded store, plus another request that takes ``stolen`` items' last exposure
    between this request's read and its reservation (the race the atomic reserve exists for).
    """

    stolen: list[str] = []

    async def fetch(self, user_id: str, item_ids: list[str], day: str) -> FetchResult:
        result = await super().fetch(user_id, item_ids, day)
        await self.reserve_exposures(self.stolen, np.ones(len(self.stolen), np.int64), day)
        return result


def test_refused_reservation_is_refilled_from_the_next_items(
    world: World, client_for: Callable[..., AppClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("service.app.EmbeddedFeatureStore", RacingStore)
    client = client_for()
    cands = [f"i{k}" for k in range(12)]
    ids, _ = expected(world, "u4", cands, len(cands))
    RacingStore.stolen = [ids[1], ids[3]]
    body = {"user_id": "u4", "candidates": [{"item_id": i} for i in cands], "size": 4,
            "scene": "capped", "explain": True}  # fmt: skip
    r = client.post("/rank", json=body).json()
    assert [it["item_id"] for it in r["items"]] == [ids[0], ids[2], ids[4], ids[5]]
    assert {(d["item_id"], d["reason"]) for d in r["dropped"]} == {
        (ids[1], "exposure_cap_race"), (ids[3], "exposure_cap_race")
    }  # fmt: skip
    text = client.get("/metrics").text
    assert 'mtrank_items_dropped_total{reason="exposure_cap_race"} 2.0' in text


class SlowReserveStore(EmbeddedFeatureStore):
    """The real embedded store behind a slow reservation round trip (a far or busy Redis)."""

    delay_s = 0.5

    async def reserve_exposures(
        self, item_ids: list[str], caps: np.ndarray, day: str
    ) -> np.ndarray:
        await asyncio.sleep(self.delay_s)
        return await super().reserve_exposures(item_ids, caps, day)


def test_the_reservation_is_timed_as_its_own_stage_and_rules_do_no_io(
    client_for: Callable[..., AppClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("service.app.EmbeddedFeatureStore", SlowReserveStore)
    client = client_for()
    body = {"user_id": "u1", "candidates": [{"item_id": f"i{k}"} for k in range(10)], "size": 5,
            "scene": "diverse"}  # fmt: skip
    assert client.post("/rank", json=body).status_code == 200
    text = client.get("/metrics").text

    def seconds(stage: str, series: str = "sum") -> float:
        return metric_value(text, f"mtrank_request_stage_seconds_{series}", {"stage": stage})

    ranked = [s for s in STAGES if s != "recall"]  # /rank has no recall stage; /recommend does
    assert {s: seconds(s, "count") for s in ranked} == dict.fromkeys(ranked, 1.0)
    assert seconds("recall", "count") == 0.0
    assert seconds("reserve") >= SlowReserveStore.delay_s
    assert seconds("total") >= SlowReserveStore.delay_s
    for pure in ("fusion", "rules"):
        assert seconds(pure) < SlowReserveStore.delay_s / 2, pure


def test_redis_caps_hold_across_processes(
    world: World, client_for: Callable[..., AppClient], redis_namespace: str
) -> None:
    # Two apps = two workers sharing one Redis: an exposure taken by one is seen by the other.
    a = client_for(redis_url=REDIS_URL, feature_namespace=redis_namespace)
    b = client_for(redis_url=REDIS_URL, feature_namespace=redis_namespace)
    cands = [{"item_id": f"i{k}"} for k in range(6)]
    body = {"user_id": "u1", "candidates": cands, "size": 3, "scene": "capped", "explain": True}
    first = a.post("/rank", json=body).json()
    second = b.post("/rank", json=body).json()
    shown = {it["item_id"] for it in first["items"]}
    assert len(shown) == 3
    assert {it["item_id"] for it in second["items"]} == {c["item_id"] for c in cands} - shown
    assert {d["item_id"] for d in second["dropped"]} == shown
    third = a.post("/rank", json=body).json()
    assert third["items"] == [] and len(third["dropped"]) == 6


def test_admin_reload_swaps_model_and_rejects_a_bad_config(
    tmp_path: Path, own_world: World, exported_models: ExportedModels,
    client_for: Callable[..., AppClient],
) -> None:  # fmt: skip
    w = own_world
    ranking = tmp_path / "ranking.yaml"
    ranking.write_text(RANKING_YAML)
    client = start_for(w, client_for, ranking)
    cands = [f"i{k}" for k in range(10)]
    body = {"user_id": "u1", "candidates": [{"item_id": i} for i in cands], "size": 5}
    assert client.post("/rank", json=body).json()["model"]["version"] == w.model.version

    # A config that does not load: 409 with the file and key named; the old config serves.
    ranking.write_text(RANKING_YAML.replace("default_daily_cap: 1000", "default_daily_cap: 0"))
    r = client.post("/admin/reload", headers=AUTH)
    assert r.status_code == 409
    assert "default_daily_cap" in r.json()["error"]["message"]
    assert client.post("/rank", json=body).status_code == 200

    # A new model version: served after reload, ranked by its own outputs.
    ranking.write_text(RANKING_YAML)
    new = exported_models.publish(w.root, "ecommerce", alternate=True)  # other weights
    r = client.post("/admin/reload", headers=AUTH)
    assert r.status_code == 200 and r.json()["models"] == {"ecommerce": new.version}
    got = client.post("/rank", json=body).json()
    assert got["model"]["version"] == new.version
    ids, scores = expected(World(w.root, new, w.spec, w.snapshot, w.snapshot_path, ranking),
                           "u1", cands, 5)  # fmt: skip
    assert [it["item_id"] for it in got["items"]] == ids
    np.testing.assert_allclose([it["score"] for it in got["items"]], scores, rtol=1e-5)
    old = dict(zip(*expected(w, "u1", cands, len(cands)), strict=True))  # the old model's
    assert not np.allclose(scores, [old[i] for i in ids], rtol=1e-3)
    text = client.get("/metrics").text
    info = 'mtrank_model_info{{name="ecommerce",provider="CPUExecutionProvider",version="{}"}}'
    assert info.format(new.version) + " 1.0" in text
    assert info.format(w.model.version) + " 0.0" in text
    assert 'mtrank_model_reloads_total{result="failure"} 1.0' in text


def test_models_the_formula_does_not_fit_are_rejected_and_the_old_keep_serving(
    own_world: World, exported_models: ExportedModels, client_for: Callable[..., AppClient]
) -> None:
    w = own_world
    client = start_for(w, client_for, w.ranking_path)
    body = {"user_id": "u1", "candidates": [{"item_id": "i1"}, {"item_id": "i2"}]}
    # Same inputs, but no "cvr" output: the formula ctr * (alpha + cvr) ... cannot run on it.
    spec = w.spec.model_copy(update={"outputs": [o for o in w.spec.outputs if o.name != "cvr"]})
    exported_models.publish(w.root, "ecommerce", spec=spec)
    r = client.post("/admin/reload", headers=AUTH)
    assert r.status_code == 409 and "cvr" in r.json()["error"]["message"]
    after = client.post("/rank", json=body)
    assert after.status_code == 200 and after.json()["model"]["version"] == w.model.version


def test_watcher_hot_swaps_a_promoted_version(
    own_world: World, exported_models: ExportedModels, client_for: Callable[..., AppClient]
) -> None:
    w = own_world
    client = start_for(w, client_for, w.ranking_path, reload_poll_seconds=0.05)
    new = exported_models.publish(w.root, "ecommerce", alternate=True, promote=False)
    Registry(w.root).promote("ecommerce", new.version)
    body = {"user_id": "u1", "candidates": [{"item_id": "i1"}]}
    deadline = time.monotonic() + 5.0
    version = None
    while time.monotonic() < deadline:
        version = client.post("/rank", json=body).json()["model"]["version"]
        if version == new.version:
            break
        time.sleep(0.05)
    assert version == new.version


def start_for(
    w: World, client_for: Callable[..., AppClient], ranking: Path, **kw: Any
) -> AppClient:
    settings = w.settings(ranking_config=ranking, **kw)
    overrides = {k: getattr(settings, k) for k in Settings.model_fields}
    return client_for(**overrides)


def test_config_watcher_applies_a_changed_file_and_keeps_the_old_on_error(
    tmp_path: Path, own_world: World, client_for: Callable[..., AppClient]
) -> None:
    # Every worker runs this watcher, so a config change reaches all of them (admin reload
    # reaches only the worker that receives the request).
    w = own_world
    ranking = tmp_path / "ranking.yaml"
    ranking.write_text(RANKING_YAML)
    client = start_for(w, client_for, ranking, config_poll_seconds=0.05)
    body = {"user_id": "u1", "candidates": [{"item_id": f"i{k}"} for k in range(6)], "size": 6}

    def scores() -> list[float]:
        return [it["score"] for it in client.post("/rank", json=body).json()["items"]]

    def wait_for(check: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if check():
                return True
            time.sleep(0.05)
        return False

    before = scores()
    # A changed formula: every score doubles once the watcher has picked the file up.
    ranking.write_text(RANKING_YAML.replace('"ctr * (alpha', '"2 * ctr * (alpha'))
    assert wait_for(lambda: scores() == pytest.approx([2 * s for s in before]))
    # A broken file: rejected, counted, and the last good config keeps serving.
    ranking.write_text(RANKING_YAML.replace("window: 2", "window: 0"))
    assert wait_for(
        lambda: 'mtrank_model_reloads_total{result="failure"} 1.0' in client.get("/metrics").text
    )
    assert scores() == pytest.approx([2 * s for s in before])
