"""Training/serving consistency: the classic skew, caught end to end.

For logged impressions of the test split, the per-task predictions torch computes from the
training pipeline's encoded rows must equal, within 1e-5, what the running service computes from
the features it reads from Redis (snapshot built from the attribute tables, loaded with the
loader) plus the request's context. Any drift in vocabularies, normalisation, column order,
defaults, snapshot layout or assembly breaks this test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq
import pytest
import redis
import torch

from harness.trained import TrainedWorld
from mtrank.snapshot_loader import load_snapshot_to_redis
from service.app import create_app
from service.settings import Settings
from tests.support import REDIS_URL
from tests.support.app_client import AppClient
from training.checkpoint import load_checkpoint

pytestmark = pytest.mark.integration
N_IMPRESSIONS = 1200


@pytest.fixture
def served(trained_world: TrainedWorld) -> Iterator[AppClient]:
    ns = f"test-e2e-{os.getpid()}-{os.urandom(3).hex()}"
    conn = redis.Redis.from_url(REDIS_URL)
    load_snapshot_to_redis(conn, ns, trained_world.snapshot)
    settings = Settings(
        model_dir=trained_world.root,
        model_names=["ecommerce"],
        redis_url=REDIS_URL,
        feature_namespace=ns,
        redis_timeout_ms=1000,
        reload_poll_seconds=0,
        ort_providers="cpu",
    )
    client = AppClient(create_app(settings))
    try:
        yield client
    finally:
        client.close()
        keys = list(conn.scan_iter(match=f"mtrank:{ns}:*", count=1000))
        if keys:
            conn.delete(*keys)
        conn.close()


def test_service_predictions_equal_training_predictions(
    trained_world: TrainedWorld, served: AppClient
) -> None:
    split = trained_world.data.test
    assert split is not None and len(split) >= N_IMPRESSIONS
    rows = pq.read_table(trained_world.data_dir / "test.parquet").slice(0, N_IMPRESSIONS)
    logged = rows.to_pylist()
    model, _, _, _ = load_checkpoint(trained_world.checkpoint)
    batch = split.take(slice(0, N_IMPRESSIONS))
    with torch.no_grad():
        want = model.predict(torch.from_numpy(batch.sparse), torch.from_numpy(batch.dense))
    want_np = {k: v.numpy().astype(np.float64) for k, v in want.items()}

    context_fields = [f.name for f in trained_world.spec.sparse if f.source == "context"]
    context_fields += [f.name for f in trained_world.spec.dense if f.source == "context"]
    worst = dict.fromkeys(want_np, 0.0)
    cold = 0
    for i, row in enumerate(logged):
        body = {
            "user_id": str(row["user_id"]),
            "candidates": [{"item_id": str(row["item_id"])}],
            "context": {f: row[f] for f in context_fields},
            "size": 1,
            "explain": True,
        }
        r = served.post("/rank", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["degraded"] == []
        item = out["items"][0]
        feats = item["explain"]["features"]
        cold += not (feats["user_found"] and feats["item_found"])
        for task, value in item["explain"]["predictions"].items():
            worst[task] = max(worst[task], abs(value - want_np[task][i]))
    assert set(worst) == set(trained_world.spec.task_names)
    assert max(worst.values()) <= 1e-5, worst
    # The snapshot holds every user and item of the logs: nothing fell back to defaults.
    assert cold == 0
