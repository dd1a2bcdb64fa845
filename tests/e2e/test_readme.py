"""The README's command lines, run as written, in order, in one working directory.

1. The ```bash block under "## The command line" (synth, train, evaluate, export, features build
   and load, tune-fusion, models, serve), then the README's ``curl`` for ``POST /rank`` against
   the server it started.
2. The ```bash block under "## Recall: ..." (synth, train-recall, publish-recall, build-history,
   serve with ``MTRANK_RECALL_MODEL``, ``curl`` for ``POST /recommend``), over the ranker the
   first block exported, as a reader going down the page would run it.

Each line runs in ``bash -euo pipefail`` from a fresh working directory holding a copy of
training/configs (the configs' relative data paths then point into it), with the venv's ``mtrank``
first on PATH. A line that fails fails the test. The only edits are the ones in ``SUBSTITUTIONS``
and ``RECALL_SUBSTITUTIONS``, each of which must match: smaller sizes, the test Redis
(``TEST_REDIS_URL``) under a namespace of this test, the version the export published for the
README's ``VERSION`` placeholder, and the test server's address. Each server line runs in the
background, on a free port (``MTRANK_PORT``; the first on the test's namespace,
``MTRANK_FEATURE_NAMESPACE``), and is stopped with SIGTERM before the next block.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from harness.processes import free_port
from mtrank.history import HISTORY_DIR, HistorySnapshot, latest_history
from mtrank.registry import Registry
from tests.support import REDIS_URL, delete_namespace, unique_namespace
from tests.support.shell import BackgroundLine, run_line, user_env

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
README_REDIS = "redis://127.0.0.1:6379/0"
README_PORT = "http://127.0.0.1:8000"
RECALL_HEADING = "## Recall: `/recall` and `/recommend`"
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
# The recall block's edits; {base} is the test server's http://127.0.0.1:PORT.
RECALL_SUBSTITUTIONS = [
    ("--impressions 1000000", "--impressions 20000", "the first block's test-size data set"),
    ("recall_dssm.yaml ", "recall_dssm.yaml --set epochs=1 ", "one epoch"),
    ("localhost:8000", "{base}", "the test server"),
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


def substitute(
    lines: list[str], values: dict[str, str], edits: list[tuple[str, str, str]] = SUBSTITUTIONS
) -> list[str]:
    out = list(lines)
    for old, new, why in edits:
        assert any(old in line for line in out), f"README no longer says {old!r} ({why})"
        out = [line.replace(old, new.format_map(_Keep(values))) for line in out]
    return out


class _Keep(dict[str, str]):
    """``format_map`` values that leave a placeholder they do not name as it is."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def run_lines(lines: list[str], cwd: Path) -> None:
    """Run each line; where it says ``# -> PATH``, PATH must be where it wrote."""
    env = user_env()
    for line in lines:
        if "{version}" in line:
            version = Registry(cwd / "models").current("ecommerce")
            assert version, "the README's export line promoted no version"
            line = line.replace("{version}", version)
        run_line(line, cwd, env)
        arrow = re.search(r"# -> (\S+)", line)
        if arrow:
            assert (cwd / arrow.group(1)).is_file(), f"`{line}` wrote no {arrow.group(1)}"


def split_server(lines: list[str]) -> tuple[list[str], str, list[str]]:
    """(the lines before the block's one ``mtrank serve`` line, that line, the lines after)."""
    serve = [i for i, line in enumerate(lines) if " mtrank serve" in f" {line}"]
    assert len(serve) == 1, lines
    return lines[: serve[0]], lines[serve[0]], lines[serve[0] + 1 :]


@pytest.fixture
def namespace() -> Iterator[str]:
    ns = unique_namespace("readme")
    yield ns
    client = redis.Redis.from_url(REDIS_URL)
    delete_namespace(client, ns)
    client.close()


def test_the_readme_command_lines_run_as_written(tmp_path: Path, namespace: str) -> None:
    shutil.copytree(REPO / "training" / "configs", tmp_path / "training" / "configs")
    check_command_line(tmp_path, namespace)
    check_recall_path(tmp_path)


def check_command_line(tmp_path: Path, namespace: str) -> None:
    lines = substitute(readme_block("## The command line"), {"ns": namespace})
    before, serve, after = split_server(lines)
    assert not after, after
    run_lines(before, tmp_path)

    port = free_port()
    server_env = user_env({"MTRANK_PORT": str(port), "MTRANK_FEATURE_NAMESPACE": namespace})
    server = BackgroundLine(serve, tmp_path, server_env, port).start(timeout_s=120)
    try:
        curl = readme_curl().replace(README_PORT, server.base_url)
        answer = json.loads(run_line(curl, tmp_path, user_env()).stdout)
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


def check_recall_path(tmp_path: Path) -> None:
    """The recall block after the first, in the same directory: /recommend over its ranker."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    lines = substitute(readme_block(RECALL_HEADING), {"base": base}, RECALL_SUBSTITUTIONS)
    before, serve, after = split_server(lines)
    curls = [line for line in after if line.startswith("curl ")]
    assert len(curls) == 1 and "/recommend" in curls[0], after
    run_lines(before, tmp_path)

    # No MTRANK_REDIS_URL: the snapshot the first block built and the histories, both in memory.
    server_env = user_env({"MTRANK_PORT": str(port)})
    server = BackgroundLine(serve, tmp_path, server_env, port).start(timeout_s=120)
    try:
        answer = json.loads(run_line(curls[0], tmp_path, user_env()).stdout)
    finally:
        rc = server.stop()
    assert rc in (0, -signal.SIGTERM), server.log_text()  # one worker re-raises SIGTERM

    registry = Registry(tmp_path / "models")
    body = json.loads(re.search(r"-d '(\{.*\})'", curls[0]).group(1))  # type: ignore[union-attr]
    path = latest_history(registry.model_dir("recall") / HISTORY_DIR)
    assert path is not None, "the README's build-history line wrote no history"
    hist = HistorySnapshot.load(path)
    u = hist.user_ids.tolist().index(body["user_id"])
    seen = set(hist.items[hist.offsets[u] : hist.offsets[u + 1]].tolist())
    assert seen, f"the README's user {body['user_id']} has no clicks at the test's data size"

    assert answer["recall_model"] == {"name": "recall", "version": registry.current("recall")}
    assert answer["model"] == {"name": "ecommerce", "version": registry.current("ecommerce")}
    assert answer["degraded"] == []  # the user's history was found: recalled by the index
    items = answer["items"]
    assert len(items) == body["size"]
    assert all(it["source"] == "ann" and it["recall_score"] is not None for it in items)
    ids = {int(it["item_id"]) for it in items}
    assert len(ids) == len(items) and not ids & seen
    # scores > 0, not sorted: the default scene's diversity rule may move an item down
    assert all(it["score"] > 0 for it in items)
