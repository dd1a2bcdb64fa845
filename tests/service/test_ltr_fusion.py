"""Learned fusion served: ``fusion: {type: model}`` in a scene or an arm, with explain and checks.

The LTR model is a small LambdaMART trained and published by the real pipeline
(tests/support/ltr.py) over inputs the served model and the snapshot produce: ctr, cvr, price,
quality, promoted.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mtrank.registry import ModelVersion, Registry
from service.ranking_config import RankingConfigError
from tests.service.conftest import RANKING_YAML, World
from tests.service.test_experiments import rank_body, two_arms
from tests.support.app_client import AppClient
from tests.support.ltr import fit_toy, publish_toy, toy_config, toy_split
from training.ltr.export import Trained, export_ltr


@pytest.fixture(scope="module")
def ltr(world: World) -> tuple[ModelVersion, Trained]:
    return publish_toy(world.root, "lambdamart", name="fusion")


def ltr_scene_config(world: World, model: str = "fusion", extra: str = "") -> Path:
    doc = RANKING_YAML.replace(
        "  capped:\n",
        f"  learned:\n    fusion: {{type: model, model: {model}}}\n"
        "    rules:\n      boosts:\n"
        "        - {name: promoted, when: [{field: promoted, op: eq, value: 1}], multiplier: 2.0}\n"
        "  capped:\n",
    )  # fmt: skip
    path = world.root / "ranking-ltr.yaml"
    path.write_text(doc + extra)
    return path


def test_a_learned_fusion_scores_with_the_ltr_model_and_explains_its_inputs(
    world: World, ltr: tuple[ModelVersion, Trained], client_for: Callable[..., AppClient]
) -> None:
    mv, trained = ltr
    client = client_for(ranking_config=ltr_scene_config(world))
    r = client.post("/rank", json={**rank_body("u1", 16), "scene": "learned", "explain": True})
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert len(items) == 16
    x = np.array([[it["explain"]["factors"][name] for name in trained.inputs] for it in items],
                 dtype=np.float32)  # fmt: skip
    native = trained.native(x)  # the LightGBM booster itself, on the inputs explain shows
    for it, want in zip(items, native, strict=True):
        f = it["explain"]["factors"]
        assert f["ltr_score"] == pytest.approx(float(want), abs=1e-5)
        assert it["score"] == pytest.approx(f["ltr_score"] + math.log(f["rule_weight"]), abs=1e-9)
        assert f["rule_weight"] == (2.0 if f["promoted"] == 1 else 1.0)
    ranked = [it["score"] for it in items]
    assert ranked == sorted(ranked, reverse=True)  # no diversity in this scene: score order


def test_an_arm_can_compare_the_formula_with_the_learned_fusion(
    world: World, ltr: tuple[ModelVersion, Trained], client_for: Callable[..., AppClient]
) -> None:
    exp = two_arms(fusion={"type": "model", "model": f"fusion@{ltr[0].version}"})
    path = world.root / "ranking-ltr-arm.yaml"
    path.write_text(RANKING_YAML + "experiments: " + json.dumps([exp]) + "\n")
    client = client_for(ranking_config=path)
    body = {**rank_body("u2", 12), "explain": True}
    formula = client.post("/rank", json=body, headers={"X-Mtrank-Arm": "exp=control"}).json()
    learned = client.post("/rank", json=body, headers={"X-Mtrank-Arm": "exp=candidate"}).json()
    assert "ltr_score" in learned["items"][0]["explain"]["factors"]
    assert "ltr_score" not in formula["items"][0]["explain"]["factors"]
    assert learned["experiments"] == [{"experiment": "exp", "arm": "candidate"}]


def publish_with_inputs(root: Path, inputs: tuple[str, ...], name: str) -> ModelVersion:
    """The toy LambdaMART with its columns renamed: a model that reads other names."""
    valid = dataclasses.replace(toy_split(40, seed=100), inputs=inputs)
    trained = dataclasses.replace(fit_toy("lambdamart"), inputs=inputs)
    cfg = toy_config(root, "lambdamart", name).model_copy(update={"promote": True})
    return export_ltr(cfg, trained, valid.x, {}, None, Registry(root))


@pytest.mark.parametrize(
    ("where", "needle"),
    [
        ("scene", "scenes.learned.fusion.model: LTR model watch_fusion@"),
        ("arm", "experiments[0].arms[1].fusion.model: LTR model watch_fusion@"),
    ],
)
def test_an_ltr_model_reading_what_the_models_do_not_produce_is_refused(
    world: World, ltr: tuple[ModelVersion, Trained], where: str, needle: str
) -> None:
    from service.app import create_app
    from tests.support.app_client import AppClient as Client

    publish_with_inputs(world.root, ("ctr", "cvr", "price", "quality", "watch_time"),
                        "watch_fusion")  # fmt: skip
    if where == "scene":
        path = ltr_scene_config(world, "watch_fusion")
    else:
        exp = two_arms(fusion={"type": "model", "model": "watch_fusion"})
        path = world.root / "ranking-ltr-bad.yaml"
        path.write_text(RANKING_YAML + "experiments: " + json.dumps([exp]) + "\n")
    with pytest.raises(RankingConfigError) as info:
        Client(create_app(world.settings(ranking_config=path)))
    assert needle in str(info.value), str(info.value)
    assert "reads ['watch_time']" in str(info.value)


def test_an_unknown_ltr_model_is_refused_on_reload_and_the_old_config_serves(
    world: World, ltr: tuple[ModelVersion, Trained], client_for: Callable[..., AppClient]
) -> None:
    path = ltr_scene_config(world)
    client = client_for(ranking_config=path)
    path.write_text(ltr_scene_config(world, "no_such_ltr").read_text())
    auth = {"Authorization": "Bearer test-admin-token-0123456789"}
    r = client.post("/admin/reload", headers=auth)
    assert r.status_code == 409
    assert "scenes.learned.fusion.model" in r.json()["error"]["message"]
    served = client.post("/rank", json={**rank_body("u0"), "scene": "learned", "explain": True})
    assert "ltr_score" in served.json()["items"][0]["explain"]["factors"]
