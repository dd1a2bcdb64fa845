"""The HTTP API end to end: the model the training pipeline exported, the embedded store and a
real Redis.

Rankings are checked against a computation outside the service (onnxruntime run directly on the
exported model.onnx + the test formula + the test rules); every error case against its documented
status and the field it names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import orjson
import pytest
from pydantic import TypeAdapter, ValidationError

from mtrank.snapshot import default_item_record, default_user_record
from service.api.schemas import RankRequest
from service.features.assemble import Assembler
from tests.service.conftest import (
    ADMIN_TOKEN,
    ALPHA,
    BETA,
    BOOST,
    DEMOTE,
    LOW_QUALITY,
    REDIS_URL,
    AppClient,
    World,
    chunked,
    closed_port,
)
from tests.support.exported import onnx_outputs

pytestmark = pytest.mark.integration
ITEMS = [f"i{k}" for k in range(30)]


def expected(
    world: World,
    user_id: str,
    item_ids: list[str],
    size: int,
    context: dict[str, Any] | None = None,
    *,
    cold: bool = False,
) -> tuple[list[str], np.ndarray]:
    """Item ids in rank order and their scores, computed without the service."""
    spec, snap = world.spec, world.snapshot
    users, items = list(snap.user_ids), list(snap.item_ids)
    user = default_user_record(spec)
    if user_id in users and not cold:
        user = snap.users[users.index(user_id)]
    recs = np.repeat(default_item_record(spec).reshape(1), len(item_ids))
    for k, item in enumerate(item_ids):
        if item in items and not cold:
            recs[k] = snap.items[items.index(item)]
    sparse, dense = Assembler(spec).assemble(user, recs, context)
    out = onnx_outputs(world.model, sparse, dense)
    weight = np.where(recs["promoted"] == 1, BOOST, 1.0) * np.where(
        recs["quality"] < LOW_QUALITY, DEMOTE, 1.0
    )
    score = out["ctr"] * (ALPHA + out["cvr"]) * (BETA + recs["price"]) * weight
    order = np.argsort(-score, kind="stable")[:size]
    return [item_ids[i] for i in order], score[order]


def rank_body(**kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"user_id": "u2", "candidates": [{"item_id": i} for i in ITEMS]}
    body.update(kw)
    return body


@pytest.fixture
def redis_client(client_for: Callable[..., AppClient], redis_namespace: str) -> Iterator[AppClient]:
    yield client_for(redis_url=REDIS_URL, feature_namespace=redis_namespace)


@pytest.mark.parametrize("store", ["embedded", "redis"])
def test_ranking_equals_hand_computation(
    store: str, world: World, client_for: Callable[..., AppClient], redis_namespace: str
) -> None:
    extra = {"redis_url": REDIS_URL, "feature_namespace": redis_namespace}
    client = client_for(**(extra if store == "redis" else {}))
    context = {"device": "android", "hour": 21}
    r = client.post("/rank", json=rank_body(size=10, context=context))
    assert r.status_code == 200, r.text
    body = r.json()
    ids, scores = expected(world, "u2", ITEMS, 10, context)
    assert [it["item_id"] for it in body["items"]] == ids
    np.testing.assert_allclose([it["score"] for it in body["items"]], scores, rtol=1e-5)
    assert body["degraded"] == []
    assert body["model"] == {"name": "ecommerce", "version": world.model.version}
    assert len(body["request_id"]) == 32
    assert "dropped" not in body and "explain" not in body["items"][0]


def test_unknown_user_and_items_take_defaults_and_are_flagged(
    world: World, client: AppClient
) -> None:
    cands = ["i1", "new-a", "i4", "new-b"]
    body = {"user_id": "stranger", "candidates": [{"item_id": i} for i in cands], "explain": True}
    r = client.post("/rank", json=body)
    assert r.status_code == 200
    items = r.json()["items"]
    ids, scores = expected(world, "stranger", cands, 20)
    assert [it["item_id"] for it in items] == ids
    np.testing.assert_allclose([it["score"] for it in items], scores, rtol=1e-5)
    found = {it["item_id"]: it["explain"]["features"] for it in items}
    assert found["new-a"] == {"user_found": False, "item_found": False}
    assert found["i1"] == {"user_found": False, "item_found": True}
    text = client.get("/metrics").text
    assert 'mtrank_feature_misses_total{entity="item"} 2.0' in text
    assert 'mtrank_feature_misses_total{entity="user"} 1.0' in text
    assert 'mtrank_feature_lookups_total{entity="item"} 4.0' in text


def test_explain_factors_multiply_to_the_score_and_name_the_rules(
    world: World, client: AppClient
) -> None:
    r = client.post("/rank", json=rank_body(size=30, explain=True))
    items = r.json()["items"]
    snap = world.snapshot
    for it in items:
        ex = it["explain"]
        assert set(ex["predictions"]) == {"ctr", "cvr", "stay", "cart", "collect"}
        assert set(ex["factors"]) == {"ctr", "(alpha + cvr)", "(beta + price)", "rule_weight"}
        assert np.prod(list(ex["factors"].values())) == pytest.approx(it["score"], rel=1e-9)
        assert ex["factors"]["ctr"] == pytest.approx(ex["predictions"]["ctr"])
        rec = snap.items[list(snap.item_ids).index(it["item_id"])]
        fired = ex["rules"]["rules"]
        assert ("promoted" in fired) == (rec["promoted"] == 1)
        assert ("low_quality" in fired) == (rec["quality"] < LOW_QUALITY)
        assert ex["rules"]["rule_weight"] == pytest.approx(np.prod(list(fired.values())))
    assert [it["explain"]["rules"]["position"] for it in items] == list(range(30))
    assert r.json()["dropped"] == []


def test_exposure_cap_drops_items_shown_today_with_the_reason(client: AppClient) -> None:
    cands = [{"item_id": i} for i in ["i10", "i11", "i12", "i13"]]
    first = client.post("/rank", json={"user_id": "u1", "candidates": cands, "size": 2,
                                       "scene": "capped"})  # fmt: skip
    shown = [it["item_id"] for it in first.json()["items"]]
    second = client.post("/rank", json={"user_id": "u1", "candidates": cands, "size": 4,
                                        "scene": "capped", "explain": True})  # fmt: skip
    body = second.json()
    assert sorted(d["item_id"] for d in body["dropped"]) == sorted(shown)
    assert {d["reason"] for d in body["dropped"]} == {"exposure_cap"}
    assert all(d["explain"]["rules"]["capped"] for d in body["dropped"])
    assert {it["item_id"] for it in body["items"]} == {c["item_id"] for c in cands} - set(shown)
    assert 'mtrank_items_dropped_total{reason="exposure_cap"} 2.0' in client.get("/metrics").text


U1 = b'{"user_id": "u1", '
A = b'"candidates": [{"item_id": "a"}]'
BAD = [
    (b"{not json", "body"),
    (U1 + b'"candidates": [{"item_id": "a", "price": NaN}]}', "candidates[0].price"),
    (U1 + b'"candidates": [{"item_id": "a", "price": 1e400}]}', "candidates[0].price"),
    (U1 + b'"candidates": [{"item_id": "a", "price": -1}]}', "candidates[0].price"),
    (U1 + b'"candidates": [{"item_id": "a", "price": "3"}]}', "candidates[0].price"),
    (U1 + A + b', "size": 0}', "size"),
    (U1 + A + b', "size": 2.5}', "size"),
    (U1 + A + b', "scene": "nope"}', "scene"),
    (U1 + b'"candidates": [{"item_id": "a"}, {"item_id": "a"}]}', "candidates[1].item_id"),
    (U1 + b'"candidates": []}', "candidates"),
    (b'{"user_id": "", ' + A + b"}", "user_id"),
    (b"{" + A + b"}", "user_id"),
    (U1 + b'"candidates": [{"item_id": 7}]}', "candidates[0].item_id"),
    (U1 + b'"candidates": [{"item_id": "a", "colour": "red"}]}', "candidates[0].colour"),
    (U1 + A + b', "context": {"wat": 1}}', "context.wat"),
    (U1 + A + b', "context": {"hour": NaN}}', "context.hour"),
    (U1 + A + b', "explain": "yes"}', "explain"),
    (U1 + A + b', "limit": 3}', "limit"),
    (b"[1, 2]", "body"),
]


@pytest.mark.parametrize(("raw", "field"), BAD)
def test_invalid_requests_are_422_naming_the_field(
    client: AppClient, raw: bytes, field: str
) -> None:
    r = client.post("/rank", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == field
    assert field in error["message"] or field == "body"
    assert "Traceback" not in r.text


CONFIG_DEPENDENT = {"scene", "context.wat", "context.hour", "candidates[1].item_id"}


@pytest.mark.parametrize(
    ("raw", "field"), [(raw, field) for raw, field in BAD if field not in CONFIG_DEPENDENT]
)
def test_documented_model_rejects_what_the_parser_rejects(raw: bytes, field: str) -> None:
    with pytest.raises(ValidationError):
        TypeAdapter(RankRequest).validate_json(raw)


def test_documented_model_accepts_a_valid_body() -> None:
    body = rank_body(size=3, scene="diverse", context={"hour": 3}, explain=True)
    body["candidates"][0].update(price=2, promoted=True, quality=0.5)
    parsed = TypeAdapter(RankRequest).validate_json(orjson.dumps(body))
    assert parsed.candidates[0].price == 2.0 and parsed.size == 3


def test_long_user_id_is_422(client: AppClient) -> None:
    r = client.post("/rank", json=rank_body(user_id="u" * 257))
    assert (r.status_code, r.json()["error"]["field"]) == (422, "user_id")


def test_too_many_candidates_is_413(client: AppClient) -> None:
    r = client.post("/rank", json=rank_body(candidates=[{"item_id": f"x{k}"} for k in range(51)]))
    assert r.status_code == 413
    assert r.json()["error"]["field"] == "candidates"


def test_oversized_body_is_413_with_and_without_content_length(client: AppClient) -> None:
    big = b'{"user_id": "' + b"u" * 20_000 + b'"}'
    r = client.post("/rank", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    body = chunked(big[:10_000], big[10_000:])  # no Content-Length to trust
    r = client.post("/rank", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413
    text = client.get("/metrics").text
    assert 'mtrank_errors_total{type="PayloadTooLarge"} 2.0' in text
    assert 'mtrank_requests_total{scene="invalid",status="413"} 2.0' in text


def test_unexpected_error_is_500_without_details(
    client_for: Callable[..., AppClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = client_for(raise_app_exceptions=False)
    ranker = client.app.state.services.ranker

    async def broken(query: Any) -> Any:
        raise RuntimeError("secret internal detail /etc/passwd")

    monkeypatch.setattr(ranker, "rank", broken)
    r = client.post("/rank", json=rank_body())
    assert r.status_code == 500
    assert r.json() == {"error": {"type": "internal_error", "message": "internal error"}}
    assert "secret" not in r.text
    text = client.get("/metrics").text
    assert 'mtrank_errors_total{type="InternalError"} 1.0' in text
    assert 'mtrank_requests_total{scene="default",status="500"} 1.0' in text


def test_redis_down_serves_defaults_with_degraded(
    world: World, client_for: Callable[..., AppClient]
) -> None:
    client = client_for(redis_url=f"redis://127.0.0.1:{closed_port()}/0")
    r = client.post("/rank", json=rank_body(size=5))
    assert r.status_code == 200
    body = r.json()
    assert body["degraded"] == ["feature_store_unavailable", "exposure_reservation_failed"]
    ids, scores = expected(world, "u2", ITEMS, 5, cold=True)
    assert [it["item_id"] for it in body["items"]] == ids
    np.testing.assert_allclose([it["score"] for it in body["items"]], scores, rtol=1e-5)
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"ready": False, "reasons": ["feature_store_unreachable"]}
    text = client.get("/metrics").text
    assert "mtrank_feature_store_up 0.0" in text
    assert 'mtrank_degraded_responses_total{reason="feature_store_unavailable"} 1.0' in text


def test_readyz_reflects_the_store(
    client_for: Callable[..., AppClient], redis_client: AppClient
) -> None:
    assert redis_client.get("/readyz").json() == {"ready": True, "reasons": []}
    empty = client_for(redis_url=REDIS_URL, feature_namespace="test-api-never-loaded")
    r = empty.get("/readyz")
    assert r.status_code == 503 and r.json()["reasons"] == ["feature_store_unreachable"]
    assert empty.get("/healthz").json() == {"status": "ok"}


def test_admin_routes_need_the_token(client_for: Callable[..., AppClient]) -> None:
    client = client_for()
    assert client.post("/admin/reload").status_code == 401
    wrong = client.post("/admin/reload", headers={"Authorization": "Bearer " + "x" * 27})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "unauthorized"
    ok = client.post("/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert ok.status_code == 200 and ok.json()["ranking_config"] == "ok"
    closed = client_for(admin_token=None)
    assert closed.post("/admin/reload", headers={"Authorization": "Bearer x"}).status_code == 404
    paths = closed.get("/openapi.json").json()["paths"]
    assert "/admin/reload" not in paths


def test_models_and_metrics_use_the_fixed_names(world: World, client: AppClient) -> None:
    assert client.post("/rank", json=rank_body(scene="diverse", size=8)).status_code == 200
    models = client.get("/models").json()
    assert models == [
        {"name": "ecommerce", "version": world.model.version, "provider": "CPUExecutionProvider",
         "tasks": world.spec.task_names, "metrics": world.model.metadata()["metrics"]}
    ]  # fmt: skip
    text = client.get("/metrics").text
    assert 'mtrank_requests_total{scene="diverse",status="200"} 1.0' in text
    for stage in ("parse", "features", "inference", "fusion", "rules", "reserve", "total"):
        assert f'mtrank_request_stage_seconds_count{{stage="{stage}"}} 1.0' in text
    assert "mtrank_request_candidates_sum 30.0" in text
    assert (
        f'mtrank_model_info{{name="ecommerce",provider="CPUExecutionProvider",'
        f'version="{world.model.version}"}} 1.0'
    ) in text
    assert 'mtrank_model_reloads_total{result="success"} 1.0' in text
    assert "mtrank_feature_store_up 1.0" in text


def test_diversity_alternates_categories_and_counts_moves(world: World, client: AppClient) -> None:
    # Categories are k % 4: these candidates hold two categories, so with "at most 1 per 2
    # positions" the output must alternate them.
    cands = [f"i{k}" for k in range(24) if k % 4 in (0, 1)]
    body = {"user_id": "u3", "candidates": [{"item_id": i} for i in cands], "size": 8,
            "scene": "diverse", "explain": True}  # fmt: skip
    items = client.post("/rank", json=body).json()["items"]
    cats = [int(it["item_id"][1:]) % 4 for it in items]
    assert all(a != b for a, b in zip(cats, cats[1:], strict=False))
    ids, _ = expected(world, "u3", cands, len(cands))
    first_cat = int(ids[0][1:]) % 4
    assert items[0]["item_id"] == ids[0]
    # Each position takes the best remaining item of the category it must have.
    for p, it in enumerate(items):
        want = first_cat if p % 2 == 0 else 1 - first_cat
        taken = {x["item_id"] for x in items[:p]}
        best = next(i for i in ids if int(i[1:]) % 4 == want and i not in taken)
        assert it["item_id"] == best
    moved = sum(1 for it in items if it["explain"]["rules"]["moved"] != 0)
    assert moved > 0
    text = client.get("/metrics").text
    assert f'mtrank_rule_effects_total{{rule="diversity_moved"}} {float(moved)}' in text


def test_openapi_documents_the_rank_body(client: AppClient) -> None:
    doc = client.get("/openapi.json").json()
    ref = doc["paths"]["/rank"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert ref == {"$ref": "#/components/schemas/RankRequest"}
    schemas = doc["components"]["schemas"]
    assert set(schemas["RankRequest"]["properties"]) == {
        "user_id", "candidates", "size", "scene", "context", "explain"
    }  # fmt: skip
    assert schemas["Candidate"]["properties"]["price"]["anyOf"][0]["minimum"] == 0
    assert "RankResponse" in schemas
