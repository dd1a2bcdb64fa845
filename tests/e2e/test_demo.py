"""``mtrank demo`` end to end at small sizes: a fresh directory -> synthetic logs -> a trained,
exported and promoted MMoE -> a feature snapshot -> a trained and published DSSM recall model and
the users' histories -> a served model that ranks the README's request and answers ``/recommend``.

The demo runs as the user runs it (the ``mtrank`` console script, in an empty working directory),
with its documented size flags turned down (``--impressions``, ``--epochs``, ``--recall-epochs``)
and a free port.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest

from harness.processes import free_port, http_post
from mtrank.history import HISTORY_DIR, HistorySnapshot, latest_history
from mtrank.registry import Registry
from tests.support.shell import BackgroundLine, user_env

pytestmark = pytest.mark.integration
README = Path(__file__).resolve().parents[2] / "README.md"


def readme_rank_body() -> dict[str, object]:
    """The body of the README's ready-to-paste ``curl`` for ``POST /rank``."""
    found = re.search(r"curl -s -X POST \S+/rank .*?-d '(\{.*?\})'", README.read_text(), re.S)
    assert found, "README.md has no curl example for POST /rank"
    body: dict[str, object] = json.loads(found.group(1))
    return body


def user_with_history(registry: Registry, name: str) -> tuple[str, set[int]]:
    """A user whose history (the file the demo built) has clicks, and the items clicked."""
    path = latest_history(registry.model_dir(name) / HISTORY_DIR)
    assert path is not None, f"the demo built no history under {registry.root}/{name}"
    hist = HistorySnapshot.load(path)
    u = next(u for u in range(len(hist.user_ids)) if hist.offsets[u + 1] > hist.offsets[u])
    return str(hist.user_ids[u]), set(hist.items[hist.offsets[u] : hist.offsets[u + 1]].tolist())


def test_demo_trains_exports_and_serves_a_ranking(tmp_path: Path) -> None:
    port = free_port()
    line = (f"mtrank demo --port {port} --root models --data data/ecommerce "
            "--impressions 5000 --epochs 1 --recall-epochs 1")  # fmt: skip
    demo = BackgroundLine(line, tmp_path, user_env(), port)
    demo.start(timeout_s=240)
    registry = Registry(tmp_path / "models")
    try:
        body = readme_rank_body() | {"explain": True}
        status, raw = http_post(f"{demo.base_url}/rank", json.dumps(body).encode())
        assert status == 200, raw
        answer = json.loads(raw)
        user, seen = user_with_history(registry, "recall")
        recommend = {"user_id": user, "size": 5}
        status, raw = http_post(f"{demo.base_url}/recommend", json.dumps(recommend).encode())
        assert status == 200, raw
        recommended = json.loads(raw)
    finally:
        rc = demo.stop()
    log = demo.log_text()
    # A clean stop: the app shut down, then uvicorn (one worker) re-raises SIGTERM on exit.
    assert rc in (0, -signal.SIGTERM), log
    assert "Application shutdown complete" in log and "Finished server process" in log, log

    # What the demo said it did, it did: a promoted version with a snapshot for its spec.
    version = registry.current("ecommerce")
    assert version is not None and f"exported and promoted ecommerce/{version}" in log, log
    assert "generating 5,000 synthetic e-commerce impressions" in log
    assert "built feature snapshot" in log

    # The README's request, ranked by that version from real features.
    candidates = [c["item_id"] for c in body["candidates"]]  # type: ignore[attr-defined]
    items = answer["items"]
    assert answer["model"] == {"name": "ecommerce", "version": version}
    assert answer["degraded"] == []
    assert len(items) == body["size"] == 2
    assert {it["item_id"] for it in items} <= set(candidates)
    scores = [it["score"] for it in items]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    for it in items:
        assert it["explain"]["features"] == {"user_found": True, "item_found": True}
        assert 0.0 < it["explain"]["predictions"]["ctr"] < 1.0

    # /recommend: the demo's recall model recalled candidates for a user with clicks (the index,
    # not the popularity fallback), never one the user clicked, and the served ranker ordered them.
    recall_version = registry.current("recall")
    assert recall_version is not None and f"published and promoted recall/{recall_version}" in log
    assert "built user histories" in log, log
    assert recommended["recall_model"] == {"name": "recall", "version": recall_version}
    assert recommended["model"] == {"name": "ecommerce", "version": version}
    assert recommended["degraded"] == []
    items = recommended["items"]
    assert len(items) == recommend["size"]
    assert all(it["source"] == "ann" and it["recall_score"] is not None for it in items)
    ids = {int(it["item_id"]) for it in items}
    assert len(ids) == len(items) and not ids & seen
    # scores > 0, not sorted: the default scene's diversity rule may move an item down
    assert all(it["score"] > 0 for it in items)
