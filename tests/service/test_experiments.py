"""Experiments: the config's checks, deterministic and uniform assignment, arms served for real.

The app tests run the real app over the pipeline's exported model; the "candidate" arm serves
another exported version of it (same features, other weights), so an arm's scores can be checked
against that version's own onnxruntime outputs.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mtrank.registry import ModelVersion
from service.errors import InvalidRequest
from service.experiments import (
    TOTAL_BP,
    ExperimentConfig,
    Splitter,
    bucket,
    parse_arm_header,
)
from service.ranking_config import RankingConfigError, load_ranking_config
from tests.service.conftest import RANKING_YAML, World
from tests.support.app_client import AppClient
from tests.support.exported import ExportedModels

OUTPUTS = {"ctr", "cvr"}
# chi-square critical values at p = 0.001 (df = 1, 2, 3): a fair hash fails 1 run in 1,000
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266}


def chi_square(observed: np.ndarray, expected: np.ndarray) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


def users(n: int, prefix: str = "user") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


# ------------------------------------------------------------------ assignment
def test_the_bucket_is_a_pure_function_of_salt_and_user() -> None:
    assert bucket("layer-a", "u1") == bucket("layer-a", "u1")
    assert 0 <= bucket("layer-a", "u1") < TOTAL_BP
    assert [bucket("a", u) for u in users(50)] != [bucket("b", u) for u in users(50)]


@pytest.mark.parametrize("split", [[5000, 5000], [2000, 3000, 5000], [100, 9900], [2500] * 4])
def test_arms_receive_their_share_chi_square(split: list[int]) -> None:
    exp = ExperimentConfig.model_validate(
        {"name": "e", "arms": [{"name": f"a{i}", "bp": bp} for i, bp in enumerate(split)]}
    )
    sp = Splitter.of(exp)
    ids = users(40_000)
    counts = np.bincount([sp.arm(u) for u in ids], minlength=len(split))
    expected = np.array(split) / TOTAL_BP * len(ids)
    df = len(split) - 1
    assert chi_square(counts, expected) < CHI2_999[df], (counts, expected)


def test_two_layers_are_independent_chi_square() -> None:
    arms = [{"name": "x", "bp": 5000}, {"name": "y", "bp": 5000}]
    a = Splitter.of(ExperimentConfig.model_validate({"name": "a", "arms": arms}))
    b = Splitter.of(ExperimentConfig.model_validate({"name": "b", "arms": arms}))
    ids = users(40_000)
    table = np.zeros((2, 2))
    for u in ids:
        table[a.arm(u), b.arm(u)] += 1
    expected = np.outer(table.sum(1), table.sum(0)) / table.sum()
    assert chi_square(table, expected) < CHI2_999[1], table


def test_zero_bp_arms_are_never_drawn() -> None:
    arms = [{"name": "off", "bp": 0}, {"name": "on", "bp": 10_000}]
    sp = Splitter.of(ExperimentConfig.model_validate({"name": "e", "arms": arms}))
    assert {sp.arm(u) for u in users(2_000)} == {1}


def test_the_arm_header_is_parsed_and_checked() -> None:
    known = {"e1": ("control", "ltr"), "e2": ("a", "b")}
    assert parse_arm_header("e1=ltr, e2=a", known) == {"e1": "ltr", "e2": "a"}
    assert parse_arm_header(None, known) == {}
    for bad, needle in (("e3=a", "unknown experiment 'e3'"), ("e1=x", "has no arm 'x'"),
                        ("e1", "not EXPERIMENT=ARM")):  # fmt: skip
        with pytest.raises(InvalidRequest, match=needle) as info:
            parse_arm_header(bad, known)
        assert info.value.field == "x-mtrank-arm"


# ------------------------------------------------------------------ config checks
def config_with(tmp_path: Path, experiments: Any = None, shadows: Any = None) -> Path:
    path = tmp_path / "ranking.yaml"
    path.write_text(_doc(experiments, shadows))
    return path


def two_arms(**arm: Any) -> dict[str, Any]:
    return {"name": "exp", "arms": [{"name": "control", "bp": 5000},
                                    {"name": "candidate", "bp": 5000, **arm}]}  # fmt: skip


@pytest.mark.parametrize(
    ("experiments", "needle"),
    [
        ([{"name": "e", "arms": [{"name": "a", "bp": 5000}, {"name": "b", "bp": 4000}]}],
         "experiments[0].arms: the arms' bp sum to 9000, not 10000"),
        ([two_arms(scene="nowhere")], "experiments[0].arms[1].scene: unknown scene 'nowhere'"),
        ([{**two_arms(), "scenes": ["nowhere"]}], "experiments[0].scenes[0]: unknown scene"),
        ([{"name": "e", "arms": [{"name": "a", "bp": 5000}, {"name": "a", "bp": 5000}]}],
         "arm 'a' is named twice"),
        ([two_arms(models=["ecommerce@v1", "ecommerce@v2"])], "model 'ecommerce' is named twice"),
        ([two_arms(models=["bad name"])], "is not NAME or NAME@VERSION"),
        ([two_arms(), {**two_arms(), "name": "exp2", "layer": "exp"}],
         "experiments[1].layer: shares layer 'exp'"),
        ([two_arms(scene="diverse"), {**two_arms(scene="capped"), "name": "exp2"}],
         "experiments[1].arms: changes scene of scene 'capped'"),
        ([two_arms(fusion={"type": "model"})], "experiments[0].arms[1].fusion.model"),
    ],
)  # fmt: skip
def test_bad_experiments_are_refused_naming_the_key(
    tmp_path: Path, experiments: Any, needle: str
) -> None:
    with pytest.raises(RankingConfigError) as info:
        load_ranking_config(config_with(tmp_path, experiments), OUTPUTS)
    assert needle in str(info.value), str(info.value)


def test_one_layer_may_hold_experiments_on_different_scenes(tmp_path: Path) -> None:
    doc = [{**two_arms(), "scenes": ["default"], "layer": "L"},
           {**two_arms(), "name": "exp2", "scenes": ["diverse"], "layer": "L"}]  # fmt: skip
    cfg = load_ranking_config(config_with(tmp_path, doc), OUTPUTS)
    assert [e.layer_name for e in cfg.experiments] == ["L", "L"]


# ------------------------------------------------------------------ served for real
@pytest.fixture
def candidate(world: World, exported_models: ExportedModels) -> ModelVersion:
    """Another version of the served model (other weights), published but not promoted."""
    return exported_models.publish(world.root, "ecommerce", alternate=True, promote=False)


def rank_body(user: str, n: int = 12) -> dict[str, Any]:
    return {"user_id": user, "candidates": [{"item_id": f"i{i}"} for i in range(n)], "size": n}


def scores_of(answer: dict[str, Any]) -> dict[str, float]:
    return {it["item_id"]: it["score"] for it in answer["items"]}


def write_config(world: World, experiments: Any = None, shadows: Any = None) -> Path:
    path = world.root / "ranking-exp.yaml"
    path.write_text(_doc(experiments, shadows))
    return path


def _doc(experiments: Any, shadows: Any) -> str:
    doc = RANKING_YAML
    if experiments is not None:
        doc += "experiments: " + json.dumps(experiments) + "\n"
    if shadows is not None:
        doc += "shadows: " + json.dumps(shadows) + "\n"
    return doc


def test_arms_serve_their_models_and_the_response_says_which(
    world: World, candidate: ModelVersion, client_for: Callable[..., AppClient]
) -> None:
    path = write_config(world, [two_arms(models=[f"ecommerce@{candidate.version}"])])
    client = client_for(ranking_config=path)
    plain = client_for()  # the same world without experiments: the control's expected answer
    seen: dict[str, set[str]] = collections.defaultdict(set)
    for user in ("u0", "u1", "u2", "u3"):
        for arm in ("control", "candidate"):
            r = client.post("/rank", json=rank_body(user), headers={"X-Mtrank-Arm": f"exp={arm}"})
            assert r.status_code == 200, r.text
            answer = r.json()
            assert answer["experiments"] == [{"experiment": "exp", "arm": arm}]
            seen[arm].add(answer["models"][0]["version"])
            reference = plain.post("/rank", json=rank_body(user)).json()
            if arm == "control":
                assert scores_of(answer) == pytest.approx(scores_of(reference))
            else:
                assert scores_of(answer) != pytest.approx(scores_of(reference))
    assert seen == {"control": {world.model.version}, "candidate": {candidate.version}}
    assert "experiments" not in plain.post("/rank", json=rank_body("u0")).json()
    metrics = client.get("/metrics").text
    for arm in ("control", "candidate"):
        assert f'mtrank_arm_requests_total{{arm="{arm}",experiment="exp",status="200"}} 4.0' in (
            metrics
        )
        assert f'mtrank_arm_served_score_count{{arm="{arm}",experiment="exp"}} 48.0' in metrics


def test_without_the_header_each_user_keeps_the_arm_its_hash_gives(
    world: World, candidate: ModelVersion, client_for: Callable[..., AppClient]
) -> None:
    exp = {**two_arms(models=[f"ecommerce@{candidate.version}"]), "salt": "s-1"}
    client = client_for(ranking_config=write_config(world, [exp]))
    sp = Splitter.of(ExperimentConfig.model_validate(exp))
    for user in [f"u{i}" for i in range(8)]:
        arms = {client.post("/rank", json=rank_body(user, 4)).json()["experiments"][0]["arm"]
                for _ in range(3)}  # fmt: skip
        assert arms == {("control", "candidate")[sp.arm(user)]}


def test_an_unknown_forced_arm_is_a_422_naming_the_header(
    world: World, client_for: Callable[..., AppClient]
) -> None:
    client = client_for(ranking_config=write_config(world, [two_arms(scene="diverse")]))
    r = client.post("/rank", json=rank_body("u0"), headers={"X-Mtrank-Arm": "exp=nope"})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "x-mtrank-arm"


def test_a_scene_profile_arm_serves_that_scenes_rules(
    world: World, client_for: Callable[..., AppClient]
) -> None:
    client = client_for(ranking_config=write_config(world, [two_arms(scene="diverse")]))
    diverse = client.post("/rank", json={**rank_body("u0", 12), "scene": "diverse"}).json()
    arm = client.post("/rank", json=rank_body("u0", 12),
                      headers={"X-Mtrank-Arm": "exp=candidate"}).json()  # fmt: skip
    assert [it["item_id"] for it in arm["items"]] == [it["item_id"] for it in diverse["items"]]


def test_a_bad_config_is_rejected_on_reload_and_the_old_one_keeps_serving(
    world: World, candidate: ModelVersion, client_for: Callable[..., AppClient]
) -> None:
    path = write_config(world, [two_arms(models=[f"ecommerce@{candidate.version}"])])
    client = client_for(ranking_config=path)
    auth = {"Authorization": "Bearer test-admin-token-0123456789"}
    bad = [
        ([two_arms(models=["ecommerce@no-such-version"])], "experiments[0].arms[1].models"),
        ([{"name": "exp", "arms": [{"name": "control", "bp": 9999}]}], "experiments[0].arms"),
        ([two_arms(scene="nowhere")], "experiments[0].arms[1].scene"),
        ([two_arms(models=["unknown_model"])], "experiments[0].arms[1].models"),
    ]
    for experiments, key in bad:
        path.write_text(_doc(experiments, None))
        r = client.post("/admin/reload", headers=auth)
        assert r.status_code == 409, r.text
        assert key in r.json()["error"]["message"], r.json()
        served = client.post("/rank", json=rank_body("u1"),
                             headers={"X-Mtrank-Arm": "exp=candidate"}).json()  # fmt: skip
        assert served["models"][0]["version"] == candidate.version


def test_assignment_is_the_same_in_every_worker_process_and_replica(
    world: World, candidate: ModelVersion
) -> None:
    """Two replicas, one of them with 2 uvicorn workers (requests land on either): every process
    gives each user the arm this test computes itself, on every request."""
    from harness.processes import ServiceProcess, http_post

    exp = {**two_arms(models=[f"ecommerce@{candidate.version}"]), "salt": "replicas"}
    path = write_config(world, [exp])
    env = {
        "MTRANK_MODEL_DIR": str(world.root), "MTRANK_MODEL_NAMES": "ecommerce",
        "MTRANK_SNAPSHOT_PATH": str(world.snapshot_path), "MTRANK_RANKING_CONFIG": str(path),
        "MTRANK_RELOAD_POLL_SECONDS": "0", "MTRANK_CONFIG_POLL_SECONDS": "0",
    }  # fmt: skip
    sp = Splitter.of(ExperimentConfig.model_validate(exp))
    ids = [f"u{i}" for i in range(8)] + [f"new-user-{i}" for i in range(24)]  # unknown users too
    with ServiceProcess(env, workers=2) as two, ServiceProcess(env, workers=1) as one:
        for user in ids:
            want = ("control", "candidate")[sp.arm(user)]
            body = json.dumps(rank_body(user, 3)).encode()
            for service in (two, two, two, one):  # new connection each: either worker of `two`
                status, raw = http_post(f"{service.base_url}/rank", body)
                assert status == 200, raw
                assert json.loads(raw)["experiments"] == [{"experiment": "exp", "arm": want}]
