"""``mtrank demo`` end to end at small sizes: a fresh directory -> synthetic logs -> a trained,
exported and promoted MMoE -> a feature snapshot -> a served model that ranks the README's request.

The demo runs as the user runs it (the ``mtrank`` console script, in an empty working directory),
with its documented size flags turned down (``--impressions``, ``--epochs``) and a free port.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest

from harness.processes import free_port, http_post
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


def test_demo_trains_exports_and_serves_a_ranking(tmp_path: Path) -> None:
    port = free_port()
    line = (f"mtrank demo --port {port} --root models --data data/ecommerce "
            "--impressions 5000 --epochs 1")  # fmt: skip
    demo = BackgroundLine(line, tmp_path, user_env(), port)
    demo.start(timeout_s=240)
    try:
        body = readme_rank_body() | {"explain": True}
        status, raw = http_post(f"{demo.base_url}/rank", json.dumps(body).encode())
        assert status == 200, raw
        answer = json.loads(raw)
    finally:
        rc = demo.stop()
    log = demo.log_text()
    # A clean stop: the app shut down, then uvicorn (one worker) re-raises SIGTERM on exit.
    assert rc in (0, -signal.SIGTERM), log
    assert "Application shutdown complete" in log and "Finished server process" in log, log

    # What the demo said it did, it did: a promoted version with a snapshot for its spec.
    registry = Registry(tmp_path / "models")
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
