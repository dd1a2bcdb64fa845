"""No training/serving skew, end to end: serve, log, post events, archive, export, score, train.

The real app ranks requests on the Redis feature store with the served-feature log on; events for
some answers go through ``POST /events`` into the stream; ``mtrank events archive`` copies them
through a consumer group; ``mtrank logs export`` joins them to the logged rows. Then:

(a) the served model (onnxruntime on its model.onnx) run on the exported inputs gives the logged
    outputs, and fusing those outputs gives the answers' scores: the exported rows are what was
    served, not a re-computation that could drift;
(b) the export's own dataset spec (``format: served``) trains with the real trainer, and the model
    it makes takes the served model's inputs, so it can be exported and served on the same
    feature snapshot.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import redis

from harness.trained import TrainedWorld
from mtrank.served_log import OUTPUT_PREFIX
from mtrank.snapshot_loader import load_snapshot_to_redis
from mtrank.spec import FeatureSpec
from service.app import create_app
from tests.service.conftest import ALPHA, BETA, BOOST, DEMOTE, LOW_QUALITY, World, make_world
from tests.support import REDIS_URL, delete_namespace, unique_namespace
from tests.support.app_client import AppClient
from tests.support.exported import ExportedModels, onnx_outputs
from training.config import load_train_config
from training.events_archive import Archiver
from training.export import export as export_onnx
from training.logs import EventSources, export
from training.served_data import DENSE_PREFIX, SPARSE_PREFIX
from training.train import train


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
    exported_models: ExportedModels,
    trained_world: TrainedWorld,
) -> World:
    return make_world(tmp_path_factory.mktemp("registry"), exported_models, trained_world)


@pytest.fixture
def namespace(world: World) -> Iterator[str]:
    """The world's snapshot in the real Redis under this test's namespace (events go there too)."""
    conn = redis.Redis.from_url(REDIS_URL)
    ns = unique_namespace("skew")
    load_snapshot_to_redis(conn, ns, world.snapshot)
    yield ns
    delete_namespace(conn, ns)
    conn.close()


def serve_and_post_events(
    world: World, namespace: str, served_dir: Path
) -> list[tuple[list[str], dict[str, Any]]]:
    """Rank five requests with every one logged, and post events for some answers."""
    settings = world.settings(served_log_dir=served_dir, served_log_sample=1.0,
                              redis_url=REDIS_URL, feature_namespace=namespace)  # fmt: skip
    client = AppClient(create_app(settings))
    try:
        answers = []
        for k, user in enumerate(["u0", "u1", "u2", "unknown-user", "u3"]):
            items = [f"i{j}" for j in range(3 * k, 3 * k + 12)]
            body = {"user_id": user, "candidates": [{"item_id": i} for i in items], "size": 5}
            r = client.post("/rank", json=body)
            assert r.status_code == 200, r.text
            answers.append((items, r.json()))
        events = []
        now = time.time()
        for k, (_, answer) in enumerate(answers):
            rid, top = answer["request_id"], answer["items"][0]["item_id"]
            base = {"request_id": rid, "user_id": "u", "ts": now}
            for it in answer["items"]:
                events.append({**base, "event_id": f"imp-{k}-{it['item_id']}",
                               "type": "impression", "item_id": it["item_id"]})  # fmt: skip
            if k in (0, 1, 3):
                events.append({**base, "event_id": f"clk-{k}", "type": "click", "item_id": top})
            if k == 0:
                events.append({**base, "event_id": "buy-0", "type": "purchase", "item_id": top,
                               "amount": 12.5})  # fmt: skip
            if k == 1:
                events.append({**base, "event_id": "stay-1", "type": "stay", "item_id": top,
                               "seconds": 40.0})  # fmt: skip
        r = client.post("/events", json={"events": events})
        assert r.json() == {"accepted": len(events), "duplicates": 0, "orphans": 0}, r.text
        log = client.app.state.services.ranker.served_log
        assert log is not None
        log.flush()
    finally:
        client.close()
    return answers


def fused(world: World, items: list[str], out: dict[str, np.ndarray]) -> np.ndarray:
    """The default scene's score of these items from the model's outputs (tests/service)."""
    recs = world.snapshot.items[[list(world.snapshot.item_ids).index(i) for i in items]]
    weight = np.where(recs["promoted"] == 1, BOOST, 1.0) * np.where(
        recs["quality"] < LOW_QUALITY, DEMOTE, 1.0
    )
    score: np.ndarray = out["ctr"] * (ALPHA + out["cvr"]) * (BETA + recs["price"]) * weight
    return score


def test_exported_rows_reproduce_the_served_scores_and_train(
    world: World, namespace: str, tmp_path: Path
) -> None:
    since = time.time() - 1
    answers = serve_and_post_events(world, namespace, tmp_path / "served")
    conn = redis.Redis.from_url(REDIS_URL)
    try:
        stats = Archiver(conn, namespace, "archive", tmp_path / "archive", "t1").run(once=True)
    finally:
        conn.close()
    assert stats.written == 5 * 5 + 3 + 2
    out = tmp_path / "export"
    report = export(tmp_path / "served", since, time.time() + 1, out,
                    EventSources(archive=tmp_path / "archive"), registry=world.root)  # fmt: skip
    assert report.served_rows == 5 * 12 and report.rows_written == 5 * 5
    table = pq.read_table(out / "train.parquet").to_pydict()
    spec = FeatureSpec.load(out)
    assert spec == world.spec

    # (a) the served model on the exported inputs: the logged outputs, and the answers' scores
    sparse = np.stack([table[SPARSE_PREFIX + f.name] for f in spec.sparse], axis=1)  # (N, S)
    dense = np.stack([table[DENSE_PREFIX + f.name] for f in spec.dense], axis=1)  # (N, D)
    again = onnx_outputs(world.model, sparse, dense)
    for task in spec.task_names:
        np.testing.assert_allclose(again[task], table[OUTPUT_PREFIX + task], rtol=1e-6)
    row = {(r, i): k for k, (r, i) in enumerate(zip(table["request_id"], table["item_id"],
                                                    strict=True))}  # fmt: skip
    for _, answer in answers:
        rows = [row[(answer["request_id"], it["item_id"])] for it in answer["items"]]
        items = [it["item_id"] for it in answer["items"]]
        scores = fused(world, items, {t: v[rows] for t, v in again.items()})
        np.testing.assert_allclose([it["score"] for it in answer["items"]], scores, rtol=1e-9)
        assert [table["position"][k] for k in rows] == list(range(len(rows)))
    # the labels of the posted events
    tops = [row[(a["request_id"], a["items"][0]["item_id"])] for _, a in answers]
    assert [table["click"][k] for k in tops] == [1, 1, 0, 1, 0]
    assert sum(table["impression"]) == 25 and sum(table["click"]) == 3
    assert (table["purchase"][tops[0]], table["amount"][tops[0]]) == (1, 12.5)
    assert table["stay_seconds"][tops[1]] == 40.0 and sum(table["purchase"]) == 1

    # (b) the export's dataset trains with the real trainer, on the served inputs as they are
    config = tmp_path / "train.yaml"
    config.write_text(
        f"dataset: {out / 'dataset.yaml'}\n"
        "model: {type: mmoe, embed_dim: 4, n_experts: 2, expert_units: [8], tower_units: [4]}\n"
        f"epochs: 1\nbatch_size: 8\nmax_steps: 1\ndevice: cpu\nout_dir: {tmp_path / 'runs'}\n"
    )
    cfg = load_train_config(config)
    assert cfg.dataset.format == "served"
    assert [t.name for t in cfg.dataset.tasks] == world.spec.task_names  # the served model's
    result = train(cfg, tmp_path / "run")
    retrained = export_onnx(result.best_checkpoint, "retrained", tmp_path / "models")
    new_spec = FeatureSpec.load(retrained.path)
    assert new_spec.model_copy(update={"outputs": []}) == spec.model_copy(update={"outputs": []})
    assert new_spec.task_names == spec.task_names
