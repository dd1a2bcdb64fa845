"""The README's command line, run as written: the ```bash block under "## The command line" (synth,
train, evaluate, export, features build and load, tune-fusion, models, serve), then the README's
``curl`` for ``POST /rank`` against the server it started.

Each line runs in ``bash -euo pipefail`` from a fresh working directory holding a copy of
training/configs (the configs' relative data paths then point into it), with the venv's ``mtrank``
first on PATH. A line that fails fails the test. The only edits are the ones in ``SUBSTITUTIONS``,
each of which must match: smaller sizes, the test Redis (``TEST_REDIS_URL``) under a namespace of
this test, and the version the export published for the README's ``VERSION`` placeholder. The
server line runs in the background, on a free port (``MTRANK_PORT``) and the same namespace
(``MTRANK_FEATURE_NAMESPACE``), and is stopped with SIGTERM at the end.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from harness.processes import free_port
from mtrank.registry import Registry
from tests.support import REDIS_URL, delete_namespace, unique_namespace
from tests.support.shell import BackgroundLine, run_line, user_env

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
README_REDIS = "redis://127.0.0.1:6379/0"
README_PORT = "http://127.0.0.1:8000"
# (README text, replacement, why). {ns} is this test's Redis namespace, {version} the version the
# README's export line published. Every entry must match at least once.
SUBSTITUTIONS = [
    ("--impressions 1000000", "--impressions 20000", "a test-size data set"),
    ("ecommerce_mmoe.yaml ", "ecommerce_mmoe.yaml --set epochs=1 ", "one epoch"),
    (README_REDIS, REDIS_URL, "the test Redis (TEST_REDIS_URL)"),
    ("features load --model ecommerce", "features load --namespace {ns} --model ecommerce",
     "keys of this test only"),
    ("promote ecommerce VERSION", "promote ecommerce {version}", "the README's placeholder"),
]  # fmt: skip


def readme_block(heading: str) -> list[str]:
    """The lines of the first ```bash block after ``heading``."""
    text = README.read_text()
    start = text.index(f"\n{heading}\n")
    found = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert found, f"no ```bash block under {heading!r} in README.md"
    return [line for line in found.group(1).splitlines() if line.strip()]


def readme_curl() -> str:
    """The README's ready-to-paste ``curl`` for ``POST /rank`` (continuation lines joined)."""
    found = re.search(r"curl -s -X POST \S+/rank .*?-d '\{.*?\}'", README.read_text(), re.S)
    assert found, "README.md has no curl example for POST /rank"
    return found.group(0).replace("\\\n", " ")


def substitute(lines: list[str], ns: str) -> list[str]:
    out = list(lines)
    for old, new, why in SUBSTITUTIONS:
        assert any(old in line for line in out), f"README no longer says {old!r} ({why})"
        out = [line.replace(old, new.replace("{ns}", ns)) for line in out]
    return out


@pytest.fixture
def namespace() -> Iterator[str]:
    ns = unique_namespace("readme")
    yield ns
    client = redis.Redis.from_url(REDIS_URL)
    delete_namespace(client, ns)
    client.close()


def test_the_readme_command_line_runs_as_written(tmp_path: Path, namespace: str) -> None:
    shutil.copytree(REPO / "training" / "configs", tmp_path / "training" / "configs")
    lines = substitute(readme_block("## The command line"), namespace)
    serve = [line for line in lines if " mtrank serve" in f" {line}"]
    assert len(serve) == 1, lines
    port = free_port()
    env = user_env()
    for line in lines:
        if line in serve:
            continue
        if "{version}" in line:
            version = Registry(tmp_path / "models").current("ecommerce")
            assert version, "the README's export line promoted no version"
            line = line.replace("{version}", version)
        run_line(line, tmp_path, env)
        # The README says where each command writes: "# -> PATH" must be where it wrote.
        arrow = re.search(r"# -> (\S+)", line)
        if arrow:
            assert (tmp_path / arrow.group(1)).is_file(), f"`{line}` wrote no {arrow.group(1)}"

    server_env = user_env({"MTRANK_PORT": str(port), "MTRANK_FEATURE_NAMESPACE": namespace})
    server = BackgroundLine(serve[0], tmp_path, server_env, port).start(timeout_s=120)
    try:
        curl = readme_curl().replace(README_PORT, server.base_url)
        answer = json.loads(run_line(curl, tmp_path, env).stdout)
    finally:
        rc = server.stop()
    assert rc == 0, server.log_text()  # two workers: the supervisor exits 0 after SIGTERM

    version = Registry(tmp_path / "models").current("ecommerce")
    assert answer["model"] == {"name": "ecommerce", "version": version}
    assert answer["degraded"] == []  # features came from the Redis the README loaded
    body = json.loads(re.search(r"-d '(\{.*\})'", curl).group(1))  # type: ignore[union-attr]
    candidates = {c["item_id"] for c in body["candidates"]}
    items = answer["items"]
    assert len(items) == body["size"] and {it["item_id"] for it in items} <= candidates
    scores = [it["score"] for it in items]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    # what the other README lines left behind and the server used
    assert (tmp_path / "models" / "fusion.yaml").is_file() and (tmp_path / "fusion.png").is_file()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert client.get(f"mtrank:{namespace}:snap".encode()) is not None
    finally:
        client.close()
