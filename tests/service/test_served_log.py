"""The served-feature log holds exactly what the models saw and said for each logged request."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mtrank.served_log import OUTPUT_PREFIX, read_segment
from service.served_log import ServedLog
from tests.service.conftest import World
from tests.support.app_client import AppClient
from tests.support.exported import onnx_outputs


def segments(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.npz"))


def served_log(client: AppClient) -> ServedLog:
    log = client.app.state.services.ranker.served_log
    assert log is not None
    return log


def test_logged_rows_reproduce_the_served_outputs_and_scores(
    world: World, client_for: Callable[..., AppClient], tmp_path: Path
) -> None:
    client = client_for(served_log_dir=tmp_path, served_log_sample=1.0)
    answers = []
    for user, n in (("u0", 12), ("u1", 7), ("unknown-user", 5)):
        body = {"user_id": user, "candidates": [{"item_id": f"i{k}"} for k in range(n)],
                "size": 4}  # fmt: skip
        answers.append((body, client.post("/rank", json=body).json()))
    served_log(client).flush()
    (path,) = segments(tmp_path)
    meta, rows = read_segment(path)
    assert len(rows["item_id"]) == 12 + 7 + 5
    assert meta["sparse"] == [f.name for f in world.spec.sparse]
    assert meta["tasks"] == list(world.spec.task_names)
    start = 0
    for body, answer in answers:
        n = len(body["candidates"])
        sl = slice(start, start + n)
        start += n
        assert set(rows["request_id"][sl]) == {answer["request_id"]}
        assert list(rows["item_id"][sl]) == [c["item_id"] for c in body["candidates"]]
        returned = [it["item_id"] for it in answer["items"]]
        by_position = {int(p): i for i, p in zip(rows["item_id"][sl], rows["position"][sl],
                                                  strict=True) if p >= 0}  # fmt: skip
        assert [by_position[k] for k in range(len(returned))] == returned
        # the model run again on the logged inputs gives the logged outputs...
        again = onnx_outputs(world.model, rows["sparse"][sl], rows["dense"][sl])
        for task in meta["tasks"]:
            np.testing.assert_allclose(again[task], rows[OUTPUT_PREFIX + task][sl], rtol=1e-6)
        # ...and the logged fused scores are the answer's scores
        score_of = dict(zip(rows["item_id"][sl], rows["score"][sl], strict=True))
        for it in answer["items"]:
            assert it["score"] == pytest.approx(score_of[it["item_id"]], rel=1e-12)
    assert rows["from_store"][:19].all() and rows["from_store"][19:].all()
    assert set(rows["models"]) == {f"ecommerce@{world.model.version}"}
    assert set(rows["snapshot"]) == {world.snapshot.version}
    assert 'mtrank_served_log_rows_total{result="written"} 24.0' in client.get("/metrics").text


def test_nothing_is_logged_at_a_zero_sample(
    client_for: Callable[..., AppClient], tmp_path: Path
) -> None:
    client = client_for(served_log_dir=tmp_path, served_log_sample=0.0)
    client.post("/rank", json={"user_id": "u0", "candidates": [{"item_id": "i1"}]})
    served_log(client).flush()
    assert segments(tmp_path) == []


def test_segments_split_at_max_rows_and_shutdown_writes_the_rest(
    world: World, tmp_path: Path
) -> None:
    from service.app import create_app

    settings = world.settings(served_log_dir=tmp_path, served_log_sample=1.0,
                              served_log_max_rows=10, served_log_flush_s=3600)  # fmt: skip
    client = AppClient(create_app(settings))
    for k in range(5):
        client.post(
            "/rank",
            json={"user_id": "u0", "candidates": [{"item_id": f"i{j}"} for j in range(k, k + 6)]},
        )
    client.close()  # shutdown writes what is queued
    total = sum(len(read_segment(p)[1]["item_id"]) for p in segments(tmp_path))
    assert total == 30
    assert len(segments(tmp_path)) >= 2
