"""/recall and /recommend over a real recall model: trained, exported, indexed and published by the
pipeline on the same synthetic logs as the session's ranking model, so recalled ids are ranked.

Expected answers are computed outside the service: the user tower by plain onnxruntime on
``user_tower.onnx`` fed through ``RecallSpec.encode_users`` from the raw users table, the top k by
numpy brute force over the vectors the flat index stores.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
import redis

from harness.load import LoadThread
from harness.processes import RedisProcess, ServiceProcess, metric_value, wait_until
from harness.trained import TrainedWorld
from mtrank.history import load_history_to_redis
from mtrank.recall_artefact import INDEX_DIR, POPULARITY_FILE
from mtrank.recall_index import INDEX_FILE
from mtrank.recall_spec import RecallSpec
from mtrank.registry import ModelVersion, Registry
from mtrank.snapshot_loader import load_snapshot_to_redis
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import RANKING_YAML
from tests.support.app_client import AppClient
from tests.support.exported import ExportedModels
from tests.support.recall import RecallWorld, index_vectors, train_recall_world

pytestmark = pytest.mark.integration
MAX_K = 100
RECALL_K = 60


@pytest.fixture(scope="module")
def recall_world(tmp_path_factory: pytest.TempPathFactory, trained_world: TrainedWorld) -> Any:
    return train_recall_world(tmp_path_factory.mktemp("recall"), trained_world.data_dir)


class Site:
    """A registry with the ranker (``ecommerce``), its snapshot, and the recall model ``recall``."""

    def __init__(self, root: Path, models: ExportedModels, trained: TrainedWorld,
                 recall: RecallWorld) -> None:  # fmt: skip
        self.root, self.recall = root, recall
        self.ranker = models.publish(root, "ecommerce")
        self.snapshot = trained.snapshot
        self.snapshot_path = trained.snapshot.save(root / "snap.npz")
        self.ranking = root / "ranking.yaml"
        self.ranking.write_text(
            RANKING_YAML.replace("  default:\n", f"  default:\n    recall: {{k: {RECALL_K}}}\n", 1)
        )
        self.version = recall.publish(root, "recall")

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "MTRANK_MODEL_DIR": str(self.root),
            "MTRANK_MODEL_NAMES": "ecommerce",
            "MTRANK_SNAPSHOT_PATH": str(self.snapshot_path),
            "MTRANK_RANKING_CONFIG": str(self.ranking),
            "MTRANK_RECALL_MODEL": "recall",
            "MTRANK_HISTORY_PATH": str(self.recall.history_path),
            "MTRANK_RECALL_MAX_K": str(MAX_K),
            "MTRANK_MAX_CANDIDATES": "500",
            "MTRANK_ORT_PROVIDERS": "cpu",
            "MTRANK_CONFIG_POLL_SECONDS": "0",
            **extra,
        }

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "model_dir": self.root, "model_names": ["ecommerce"],
            "snapshot_path": self.snapshot_path, "ranking_config": self.ranking,
            "recall_model": "recall", "history_path": self.recall.history_path,
            "recall_max_k": MAX_K, "max_candidates": 500, "ort_providers": "cpu",
            "reload_poll_seconds": 0, "config_poll_seconds": 0,
        }  # fmt: skip
        values.update(overrides)
        return Settings(**values)


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory,
    exported_models: ExportedModels,
    trained_world: TrainedWorld,
    recall_world: RecallWorld,
) -> Site:
    return Site(tmp_path_factory.mktemp("site"), exported_models, trained_world, recall_world)


@pytest.fixture
def start(site: Site) -> Iterator[Callable[..., AppClient]]:
    started: list[AppClient] = []

    def go(settings: Settings | None = None, **overrides: Any) -> AppClient:
        client = AppClient(create_app(settings or site.settings(**overrides)))
        started.append(client)
        return client

    yield go
    for client in reversed(started):
        client.close()


# -- the answer computed outside the service ---------------------------------------------------
def users_table(data_dir: Path) -> dict[str, dict[str, object]]:
    rows = pq.read_table(data_dir / "users.parquet").to_pylist()
    return {str(r["user_id"]): r for r in rows}


def brute_force(
    version: ModelVersion,
    user: dict[str, object],
    history: list[int],
    k: int,
    exclude: set[int],
    allowed: set[int] | None = None,
) -> tuple[list[int], np.ndarray]:
    spec = RecallSpec.load(version.path)
    feed = spec.encode_users([user], [history])
    sess = ort.InferenceSession(str(version.path / "user_tower.onnx"),
                                providers=["CPUExecutionProvider"])  # fmt: skip
    (vector,) = sess.run([spec.inputs.output], feed)  # (1, D)
    ids, vectors = index_vectors(version.path)
    scores = vectors @ vector[0]  # (count,) inner product, as the "ip" index scores
    keep = ~np.isin(ids, list(exclude))
    if allowed is not None:
        cats = np.load(version.path / "item_categories.npy")
        keep &= np.isin(cats, list(allowed))
    ids, scores = ids[keep], scores[keep]
    order = np.argsort(-scores, kind="stable")[:k]
    return ids[order].tolist(), scores[order]


def user_with_history(world: RecallWorld, min_clicks: int = 5) -> tuple[str, list[int]]:
    h = world.history
    lengths = np.diff(h.offsets)
    u = int(np.flatnonzero(lengths >= min_clicks)[0])
    return str(h.user_ids[u]), h.items[h.offsets[u] : h.offsets[u + 1]].tolist()


# -- tests --------------------------------------------------------------------------------------
def test_recall_returns_the_exact_top_k(site: Site, start: Callable[..., AppClient]) -> None:
    client = start()
    user_id, history = user_with_history(site.recall)
    user = users_table(site.recall.data_dir)[user_id]
    r = client.post("/recall", json={"user_id": user_id, "k": 20})
    assert r.status_code == 200, r.text
    body = r.json()
    want_ids, want_scores = brute_force(site.version, user, history, 20, set(history))
    assert [int(it["item_id"]) for it in body["items"]] == want_ids
    got = np.array([it["score"] for it in body["items"]])
    np.testing.assert_allclose(got, want_scores, rtol=1e-5, atol=1e-5)
    assert {it["source"] for it in body["items"]} == {"ann"} and body["degraded"] == []
    assert body["model"] == {"name": "recall", "version": site.version.version}


def test_filters_hold(site: Site, start: Callable[..., AppClient]) -> None:
    client = start()
    user_id, history = user_with_history(site.recall)
    user = users_table(site.recall.data_dir)[user_id]
    first = [int(it["item_id"]) for it in client.post(
        "/recall", json={"user_id": user_id, "k": 10}).json()["items"]]  # fmt: skip
    cats = np.load(site.version.path / "item_categories.npy")
    allowed = {int(c) for c in np.unique(cats[cats >= 0])[:3]}
    body = {"user_id": user_id, "k": 30, "exclude": first[:5],
            "context": {"categories": sorted(allowed)}}  # fmt: skip
    r = client.post("/recall", json=body)
    assert r.status_code == 200, r.text
    got = [int(it["item_id"]) for it in r.json()["items"]]
    ids, _ = index_vectors(site.version.path)
    category = dict(zip(ids.tolist(), cats.tolist(), strict=True))
    assert got and not set(got) & (set(first[:5]) | set(history))
    assert all(category[i] in allowed for i in got)
    want, _ = brute_force(site.version, user, history, 30, set(first[:5]) | set(history), allowed)
    assert got == want


def test_unknown_user_gets_popularity_flagged(site: Site, start: Callable[..., AppClient]) -> None:
    client = start()
    r = client.post("/recall", json={"user_id": "no-such-user", "k": 15, "exclude": []})
    assert r.status_code == 200, r.text
    body = r.json()
    popular = np.load(site.version.path / POPULARITY_FILE)[:15].tolist()
    assert [int(it["item_id"]) for it in body["items"]] == popular
    assert body["degraded"] == ["recall_popularity_fallback"]
    assert {it["source"] for it in body["items"]} == {"popularity"}
    assert all(it["score"] is None for it in body["items"])
    metrics = client.get("/metrics").text
    labels = {"reason": "recall_popularity_fallback"}
    assert metric_value(metrics, "mtrank_degraded_responses_total", labels) == 1


def test_k_over_the_limit_is_422(start: Callable[..., AppClient]) -> None:
    r = start().post("/recall", json={"user_id": "1", "k": MAX_K + 1})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "k" and "MTRANK_RECALL_MAX_K" in r.text


def test_recall_off_is_503_and_rank_still_answers(
    site: Site, start: Callable[..., AppClient]
) -> None:
    client = start(recall_model=None)
    for path, body in (("/recall", {"user_id": "1"}), ("/recommend", {"user_id": "1"})):
        r = client.post(path, json=body)
        assert r.status_code == 503 and "MTRANK_RECALL_MODEL" in r.json()["error"]["message"]
    item = str(site.snapshot.item_ids[0])
    assert client.post("/rank", json={"user_id": "1", "candidates": [{"item_id": item}]}
                       ).status_code == 200  # fmt: skip


def _break_index(version_dir: Path) -> None:
    path = version_dir / INDEX_DIR / INDEX_FILE
    path.write_bytes(path.read_bytes()[:-64])  # truncated: its sha256 no longer matches


def test_missing_index_at_start_is_503_and_rank_still_answers(
    site: Site, tmp_path: Path, start: Callable[..., AppClient]
) -> None:
    root = tmp_path / "reg"
    shutil.copytree(site.root / "ecommerce", root / "ecommerce")
    site.recall.publish(root, "recall", mutate=lambda d: shutil.rmtree(d / INDEX_DIR))
    client = start(model_dir=root)
    r = client.post("/recall", json={"user_id": "1"})
    assert r.status_code == 503 and "index" in r.json()["error"]["message"]
    assert client.post("/recommend", json={"user_id": "1"}).status_code == 503
    item = str(site.snapshot.item_ids[0])
    assert client.post("/rank", json={"user_id": "1", "candidates": [{"item_id": item}]}
                       ).status_code == 200  # fmt: skip


def test_recommend_ranks_the_recalled_items(site: Site, start: Callable[..., AppClient]) -> None:
    client = start()
    user_id, history = user_with_history(site.recall)
    recalled = client.post("/recall", json={"user_id": user_id, "k": RECALL_K}).json()["items"]
    by_id = {it["item_id"]: it["score"] for it in recalled}
    r = client.post("/recommend", json={"user_id": user_id, "size": 10, "explain": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["items"]) == 10 and body["recall_model"]["name"] == "recall"
    assert body["model"]["name"] == "ecommerce"
    for it in body["items"]:
        assert it["item_id"] in by_id and it["source"] == "ann"
        assert it["recall_score"] == pytest.approx(by_id[it["item_id"]], rel=1e-6)
        assert "predictions" in it["explain"]
        assert int(it["item_id"]) not in history
    scores = [it["score"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True)
    # the scene's recall k reached the ranker: the candidates histogram is not /rank's to count,
    # but the ranking stages ran once for this request
    metrics = client.get("/metrics").text
    assert metric_value(metrics, "mtrank_request_stage_seconds_count", {"stage": "recall"}) == 2


def test_a_corrupt_promote_is_rejected_and_the_old_keeps_serving(
    site: Site, tmp_path: Path, start: Callable[..., AppClient]
) -> None:
    root = tmp_path / "reg"
    shutil.copytree(site.root / "ecommerce", root / "ecommerce")
    good = site.recall.publish(root, "recall")
    client = start(model_dir=root)
    manager = client.app.state.services.recommender.recaller.manager
    site.recall.publish(root, "recall", second=True, mutate=_break_index)
    result = manager.reload()
    assert result.result == "failure" and "index" in (result.error or "")
    r = client.post("/recall", json={"user_id": "1", "k": 5})
    assert r.status_code == 200 and r.json()["model"]["version"] == good.version
    metrics = client.get("/metrics").text
    assert metric_value(metrics, "mtrank_recall_reloads_total", {"result": "failure"}) == 1
    fine = site.recall.publish(root, "recall", second=True)
    assert manager.reload().result == "success"
    assert client.post("/recall", json={"user_id": "1"}).json()["model"]["version"] == (
        fine.version
    )


def test_histories_from_redis(site: Site, start: Callable[..., AppClient]) -> None:
    with RedisProcess() as rp:
        conn = redis.Redis.from_url(rp.url)
        load_history_to_redis(conn, "recall", site.recall.history)
        load_snapshot_to_redis(conn, "ecommerce", site.snapshot)
        conn.close()
        client = start(redis_url=rp.url, snapshot_path=None, history_path=None)
        user_id, history = user_with_history(site.recall)
        user = users_table(site.recall.data_dir)[user_id]
        r = client.post("/recall", json={"user_id": user_id, "k": 10})
        assert r.status_code == 200 and r.json()["degraded"] == []
        want, _ = brute_force(site.version, user, history, 10, set(history))
        assert [int(it["item_id"]) for it in r.json()["items"]] == want
        r = client.post("/recommend", json={"user_id": user_id, "size": 5})
        assert r.status_code == 200 and r.json()["degraded"] == [], r.text
        rp.kill()  # the store goes away: popularity, flagged
        r = client.post("/recall", json={"user_id": user_id, "k": 10})
        assert r.status_code == 200
        assert r.json()["degraded"] == ["recall_history_unavailable", "recall_popularity_fallback"]


@pytest.mark.slow
def test_promote_under_load_fails_no_request(site: Site, tmp_path: Path) -> None:
    root = tmp_path / "reg"
    shutil.copytree(site.root / "ecommerce", root / "ecommerce")
    site.recall.publish(root, "recall")
    env = site.env(MTRANK_MODEL_DIR=str(root), MTRANK_RELOAD_POLL_SECONDS="0.2")
    user_id, _ = user_with_history(site.recall)
    body = json.dumps({"user_id": user_id, "size": 10}).encode()
    with ServiceProcess(env, workers=1) as svc:
        with LoadThread(svc.port, lambda k: body, path="/recommend", concurrency=4,
                        duration_s=8.0, summarise=lambda s, b: json.loads(b).get("recall_model")
                        ) as load:  # fmt: skip
            time.sleep(1.0)  # traffic on the old version first
            newer = site.recall.publish(root, "recall", second=True)
            wait_until(lambda: newer.version in svc.log_text(), 20.0)
            time.sleep(1.5)  # and traffic on the new one
        result = load.result()
    assert result.ok and not result.errors, result.summary()
    assert set(result.statuses) == {200}, result.summary()
    served = {s.info["version"] for s in result.ok}
    assert newer.version in served, result.summary()
    assert Registry(root).current("recall") == newer.version
