"""Model and ranking-config faults against a live 2-worker server with its own registry copy.

- A bad ranking config (invalid formula, hostile formula, invalid rule) sent through
  ``POST /admin/reload`` is refused with 409 and a message naming the key; the old config serves.
- A new model version promoted in the registry under load is picked up by every worker's watcher
  with zero failed requests; responses switch to the new ``model.version``.
- A corrupt (truncated) or incompatible (renamed input) version promoted under load is refused by
  every worker; the old version keeps serving, the failure is counted and logged.
"""

from __future__ import annotations

import time

import orjson
import pytest

from harness.load import LoadResult, LoadThread
from harness.processes import http_get, http_post, metric_value, wait_until
from harness.stack import (
    ADMIN_TOKEN,
    WORKERS,
    Stack,
    StackFactory,
    cycle,
    rank_bodies,
    ranking_yaml,
)
from mtrank.registry import Registry
from tests.reliability.conftest import (
    HOSTILE_FORMULAS,
    publish_copy,
    rename_sparse_input,
    summary_of,
    truncate_model,
)

pytestmark = pytest.mark.integration
PROBE = rank_bodies(n=1, candidates=30, size=10, seed=21)[0]


@pytest.fixture(scope="module")
def model_stack(make_stack: StackFactory) -> Stack:
    """Private registry (versions get promoted here) and a 0.5 s registry watcher."""
    return make_stack(private_registry=True, MTRANK_RELOAD_POLL_SECONDS="0.5")


def _reload(stack: Stack) -> tuple[int, dict[str, object]]:
    status, raw = http_post(
        stack.service.base_url + "/admin/reload", b"",
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
    )  # fmt: skip
    return status, orjson.loads(raw)


def _probe(stack: Stack) -> list[str]:
    status, raw = http_post(stack.service.base_url + "/rank", PROBE)
    assert status == 200, raw[:300]
    return [x["item_id"] for x in orjson.loads(raw)["items"]]


def _reloads(stack: Stack, result: str) -> float:
    return metric_value(stack.service.metrics(), "mtrank_model_reloads_total", {"result": result})


def _served_version(stack: Stack) -> str:
    status, raw = http_get(stack.service.base_url + "/models")
    assert status == 200
    return str(orjson.loads(raw)[0]["version"])


# ------------------------------------------------------------------ config faults
def _with_rules(stack: Stack, rules: str) -> str:
    """The stack's valid config with the default scene's rules replaced."""
    text = ranking_yaml(stack.source.spec)
    head, _, tail = text.partition("    rules:\n")
    _, _, rest = tail.partition("  capped:\n")
    return head + "    rules:\n" + rules + "  capped:\n" + rest


BAD_RULES = [
    ("boost multiplier < 1", "      boosts: [{name: b, when: [{field: promoted, op: eq, "
     "value: 1}], multiplier: 0.5}]\n", "scenes.default.rules.boosts[0].multiplier"),
    ("unknown attribute", "      boosts: [{name: b, when: [{field: colour, op: eq, value: 1}], "
     "multiplier: 2}]\n", "scenes.default.rules.boosts[0].when[0].field"),
    ("unknown op", "      boosts: [{name: b, when: [{field: price, op: like, value: 1}], "
     "multiplier: 2}]\n", "scenes.default.rules.boosts[0].when[0].op"),
    ("diversity window 0", "      diversity: [{field: category, window: 0, max_count: 1}]\n",
     "scenes.default.rules.diversity[0].window"),
    ("cap 0", "      exposure_cap: {enabled: true, default_daily_cap: 0}\n",
     "scenes.default.rules.exposure_cap.default_daily_cap"),
    ("unknown key", "      exposure_caps: {enabled: true}\n", "scenes.default.rules.exposure_caps"),
]  # fmt: skip


def _bad_configs(stack: Stack) -> list[tuple[str, str, str]]:
    spec = stack.source.spec
    key = "scenes.default.fusion.formula"
    out = [
        ("syntax error", ranking_yaml(spec, "ctr * ("), key),
        ("unknown name", ranking_yaml(spec, "ctr * no_such_output"), key),
        ("duplicate key", ranking_yaml(spec) + "  capped:\n    rules: {}\n", "capped"),
    ]
    out += [(f"hostile {f[:30]!r}", ranking_yaml(spec, f), key) for f in HOSTILE_FORMULAS]
    out += [(name, _with_rules(stack, rules), k) for name, rules, k in BAD_RULES]
    return out


def test_bad_ranking_config_is_refused_and_old_one_serves(model_stack: Stack) -> None:
    stack = model_stack
    good = stack.ranking_path.read_text()
    before = _probe(stack)
    failures = _reloads(stack, "failure")
    refused = 0
    try:
        for name, text, key in _bad_configs(stack):
            stack.ranking_path.write_text(text)
            status, body = _reload(stack)
            assert status == 409, (name, body)
            message = str(body["error"]["message"])  # type: ignore[index]
            assert key in message and stack.ranking_path.name in message, (name, message)
            assert "Traceback" not in message
            assert _probe(stack) == before, name  # the old config (and model) still rank
            refused += 1
    finally:
        stack.ranking_path.write_text(good)
    assert _reloads(stack, "failure") - failures == refused
    status, body = _reload(stack)  # the restored file reloads cleanly
    assert status == 200 and body["ranking_config"] == "ok"
    assert _probe(stack) == before


def test_rule_helper_builds_a_loadable_config(model_stack: Stack) -> None:
    """The rule-replacing helper itself yields a loadable config (guards the cases above)."""
    stack = model_stack
    good = stack.ranking_path.read_text()
    try:
        rules = "      diversity: [{field: category, window: 2, max_count: 1}]\n"
        stack.ranking_path.write_text(_with_rules(stack, rules))
        status, body = _reload(stack)
        assert status == 200, body
    finally:
        stack.ranking_path.write_text(good)
        assert _reload(stack)[0] == 200


# ------------------------------------------------------------------ model faults
def _load(stack: Stack) -> LoadThread:
    return LoadThread(
        stack.service.port, cycle(rank_bodies(n=32, candidates=20, seed=22)), concurrency=16,
        duration_s=40.0, max_requests=100_000, summarise=summary_of,
    )  # fmt: skip


def _all_ok(result: LoadResult) -> None:
    assert result.errors == [], result.errors[:5]
    assert dict(result.statuses) == {200: len(result.samples)}, [
        s.info for s in result.ok if s.status != 200
    ][:3]
    assert [s.info["degraded"] for s in result.ok if s.info["degraded"]] == []


def test_promote_new_version_under_load(model_stack: Stack) -> None:
    stack = model_stack
    old = _served_version(stack)
    new = publish_copy(stack.source, f"next-{int(time.time())}").version
    successes = _reloads(stack, "success")
    with _load(stack) as load:
        time.sleep(1.5)
        Registry(stack.source.root).promote(stack.source.name, new)
        promoted = time.monotonic()
        wait_until(lambda: _reloads(stack, "success") - successes >= WORKERS, 15.0)
        time.sleep(2.0)  # traffic on the new version, from both workers
        load.stop()
    result = load.result()
    _all_ok(result)
    versions = [s.info["version"] for s in result.ok]
    assert set(versions) == {old, new}
    last_old = max(s.done for s in result.ok if s.info["version"] == old)
    assert last_old - promoted < 10.0
    after = [s.info["version"] for s in result.ok if s.sent > last_old]
    assert len(after) >= 50 and set(after) == {new}  # once switched, never back
    assert _served_version(stack) == new
    text = stack.service.metrics()
    assert metric_value(text, "mtrank_model_info", {"version": new}) == 1.0
    assert _reloads(stack, "success") - successes == WORKERS


@pytest.mark.parametrize(
    ("kind", "logged"),
    [("truncated", "cannot load model.onnx"), ("renamed-input", "does not match its spec.json")],
)
def test_promote_broken_version_is_refused(model_stack: Stack, kind: str, logged: str) -> None:
    stack = model_stack
    serving = _served_version(stack)
    mutate = truncate_model if kind == "truncated" else rename_sparse_input(stack.source.spec)
    bad = publish_copy(stack.source, f"bad-{kind}-{int(time.time())}", mutate).version
    failures = _reloads(stack, "failure")
    with _load(stack) as load:
        time.sleep(1.0)
        Registry(stack.source.root).promote(stack.source.name, bad)
        wait_until(lambda: _reloads(stack, "failure") - failures >= WORKERS, 15.0)
        time.sleep(1.5)  # the watchers must not retry the same broken version
        load.stop()
    result = load.result()
    _all_ok(result)
    assert {s.info["version"] for s in result.ok} == {serving}
    assert _reloads(stack, "failure") - failures == WORKERS  # once per worker, not per poll
    assert _served_version(stack) == serving
    log = stack.service.log_text()
    failed_lines = [
        line for line in log.splitlines() if "model reload failed" in line and bad in line
    ]
    assert len(failed_lines) == WORKERS, log[-2000:]
    assert all(logged in line for line in failed_lines)
    ready, _ = http_get(stack.service.base_url + "/readyz")
    assert ready == 200
    # Put a good version back for whatever runs next.
    Registry(stack.source.root).promote(stack.source.name, serving)
