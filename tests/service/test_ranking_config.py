"""Per-scene ranking config: the shipped file loads; every error names the file and the key."""

from __future__ import annotations

import itertools
import re
import typing
from pathlib import Path

import numpy as np
import pytest
import yaml

import service
from mtrank.fusion import DEFAULT_PARAMS, FusionConfig, formula_inputs, save_fusion_file
from service.ranking_config import (
    ExposureCap,
    RankingConfigError,
    RulesConfig,
    load_ranking_config,
)
from service.rules import item_caps, rerank, rule_weight

# The file the service loads by default (service/settings.py points at the same path).
DEFAULT_RANKING_CONFIG = Path(service.__file__).parent / "config" / "ranking.yaml"

OUTPUTS = {"ctr", "cvr", "stay", "cart", "collect"}
TODAY = 20_000


def test_the_shipped_config_loads_and_scores() -> None:
    cfg = load_ranking_config(DEFAULT_RANKING_CONFIG, OUTPUTS)
    assert set(cfg.scenes) >= {"default", "home"}
    default = cfg.scene(None)
    assert default.fusion is not None and dict(default.fusion.params) == DEFAULT_PARAMS
    assert [b.multiplier for b in default.rules.boosts] == [1.2, 1.15]
    assert [d.multiplier for d in default.rules.demotions] == [0.5]
    assert [(d.field, d.window, d.max_count) for d in default.rules.diversity] == [
        ("category", 4, 1),
        ("brand", 6, 2),
    ]
    assert default.rules.exposure_cap.default_daily_cap == 10_000
    assert default.rules.exposure_cap.on_store_failure == "fail_open"
    home = cfg.scene("home")
    assert home.fusion is None  # inherits the default formula ...
    assert cfg.formula("home").text == cfg.formula("default").text  # ... compiled for it
    assert home.rules.diversity[0].window > default.rules.diversity[0].window

    # The compiled formula computes the documented default over outputs, attributes and weights.
    rng = np.random.default_rng(1)
    outputs = {k: rng.uniform(0.1, 1.0, 4) for k in OUTPUTS}
    attrs = {
        "price": np.array([0.0, 10.0, 3.5, 99.0], np.float32),
        "quality": np.array([1.0, 0.1, 0.5, 0.9], np.float32),
        "promoted": np.array([1, 0, 0, 1], np.uint8),
        "first_seen_day": np.array([TODAY, -1, TODAY - 10, TODAY - 2], np.int32),
    }
    w, _ = rule_weight(attrs, default.rules, TODAY)
    np.testing.assert_allclose(w, [1.2 * 1.15, 0.5, 1.0, 1.2 * 1.15])
    got = cfg.formula(None).evaluate(formula_inputs(outputs, attrs, w), 4)
    p = DEFAULT_PARAMS
    want = (
        outputs["ctr"]
        * (p["alpha"] + outputs["cvr"])
        * (p["beta"] + attrs["price"].astype(np.float64))
        * outputs["stay"] ** p["a"]
        * outputs["cart"] ** p["b"]
        * outputs["collect"] ** p["c"]
        * w
    )
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_a_model_without_a_task_fails_at_load() -> None:
    with pytest.raises(RankingConfigError) as info:
        load_ranking_config(DEFAULT_RANKING_CONFIG, OUTPUTS - {"stay"})
    msg = str(info.value)
    assert msg.startswith(f"{DEFAULT_RANKING_CONFIG}: scenes.default.fusion.formula: ")
    assert "unknown name 'stay'" in msg


def test_unknown_scene_and_default_scene() -> None:
    cfg = load_ranking_config(DEFAULT_RANKING_CONFIG, OUTPUTS)
    assert cfg.scene(None) is cfg.scene("default")
    with pytest.raises(KeyError, match="unknown scene 'nope'"):
        cfg.scene("nope")


BASE = {
    "scenes": {
        "default": {
            "fusion": {"formula": "ctr * (alpha + cvr) * rule_weight", "params": {"alpha": 0.1}},
            "rules": {
                "boosts": [
                    {
                        "name": "promo",
                        "when": [{"field": "promoted", "op": "eq", "value": 1}],
                        "multiplier": 1.2,
                    }
                ],
                "demotions": [
                    {
                        "name": "lowq",
                        "when": [{"field": "quality", "op": "lt", "value": 0.3}],
                        "multiplier": 0.5,
                    }
                ],
                "diversity": [{"field": "category", "window": 4, "max_count": 1}],
            },
        },
        "home": {"rules": {"diversity": [{"field": "brand", "window": 6, "max_count": 2}]}},
    }
}


def write(tmp_path: Path, doc: object) -> Path:
    path = tmp_path / "ranking.yaml"
    path.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    return path


def edited(path_in_doc: str, value: object) -> dict[str, object]:
    """BASE with one value replaced; ``path_in_doc`` like ``scenes.home.rules.diversity.0.max``."""
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    node = doc
    keys = path_in_doc.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node[k]
    last = keys[-1]
    if value is DELETE:
        del node[last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return doc


DELETE = object()
ERRORS = [
    (
        "scenes.home.rules.diversity.0.window",
        0,
        "scenes.home.rules.diversity[0].window: must be >= 1",
    ),
    ("scenes.home.rules.diversity.0.max_count", -2, "diversity[0].max_count: must be >= 1"),
    (
        "scenes.home.rules.diversity.0.field",
        "price",
        "diversity[0].field: unknown item attribute 'price'",
    ),
    ("scenes.home.colour", "red", "scenes.home.colour: unknown key"),
    (
        "scenes.default.rules.exposure_cap",
        {"default_daily_cap": 0},
        "exposure_cap.default_daily_cap: must be >= 1",
    ),
    (
        "scenes.default.rules.boosts.0.multiplier",
        0.9,
        "scenes.default.rules.boosts[0].multiplier: must be >= 1",
    ),
    ("scenes.default.rules.demotions.0.multiplier", 1.5, "demotions[0].multiplier: must be <= 1"),
    ("scenes.default.rules.demotions.0.multiplier", 0, "demotions[0].multiplier: must be > 0"),
    (
        "scenes.default.rules.demotions.0.name",
        "promo",
        "scenes.default.rules: rule name 'promo' is used twice",
    ),
    ("scenes.default.rules.boosts.0.when", [], "boosts[0].when: List should have at least 1 item"),
    (
        "scenes.default.rules.boosts.0.when.0.field",
        "colour",
        "when[0].field: unknown item attribute 'colour'",
    ),
    ("scenes.default.rules.boosts.0.when.0.op", "in", "boosts[0].when[0]: op 'in' takes a list"),
    ("scenes.default.rules.boosts.0.when.0.op", "like", "boosts[0].when[0].op: Input should be"),
    (
        "scenes.default.rules.boosts.0.when.0",
        {"field": "quality", "op": "within_days", "value": 7},
        "within_days needs an integer day field",
    ),
    (
        "scenes.default.fusion.formula",
        "ctr * nope * rule_weight",
        "scenes.default.fusion.formula: unknown name 'nope'",
    ),
    (
        "scenes.default.fusion.formula",
        "ctr.__class__",
        "scenes.default.fusion.formula: attribute access '.__class__'",
    ),
    (
        "scenes.default.fusion.formula",
        "ctr ** 100",
        "scenes.default.fusion.formula: exponent '100'",
    ),
    ("scenes.default.fusion.params", {"ctr": 1.0}, "scenes.default.fusion.params.ctr: shadows"),
    ("scenes.default.fusion.params", {"alpha": "x"}, "scenes.default.fusion.params.alpha: "),
    ("scenes.default.fusion.extra", 1, "scenes.default.fusion.extra: unknown key"),
    (
        "scenes.default.fusion_file",
        "f.yaml",
        "scenes.default: give fusion or fusion_file, not both",
    ),
    ("scenes.default.fusion", DELETE, "scenes.default: needs fusion or fusion_file"),
    (
        "scenes.default.fusion.formula",
        "ctr * cvr",
        "scenes.default.rules: boosts/demotions are configured",
    ),
    ("scenes.default", DELETE, "scenes: a scene named 'default' is required"),
    (
        "scenes.default.rules.exposure_cap",
        {"on_store_failure": "fail_soft"},
        "exposure_cap.on_store_failure: Input should be 'fail_open' or 'fail_closed'",
    ),
    ("scenes", DELETE, "scenes: required key is missing"),
]


@pytest.mark.parametrize(("where", "value", "needle"), ERRORS, ids=[e[2][:48] for e in ERRORS])
def test_errors_name_the_file_and_the_key(
    tmp_path: Path, where: str, value: object, needle: str
) -> None:
    path = write(tmp_path, edited(where, value))
    with pytest.raises(RankingConfigError) as info:
        load_ranking_config(path, OUTPUTS)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    assert needle in msg, msg


def test_base_document_loads(tmp_path: Path) -> None:
    cfg = load_ranking_config(write(tmp_path, BASE), OUTPUTS)
    assert cfg.formula("home").names == {"ctr", "cvr", "rule_weight"}


def test_inherited_formula_errors_say_which_scene_uses_it(tmp_path: Path) -> None:
    doc = edited("scenes.default.fusion.formula", "ctr * cart * rule_weight")
    with pytest.raises(
        RankingConfigError, match=r"scenes\.default\.fusion\.formula: unknown name 'cart'"
    ):
        load_ranking_config(write(tmp_path, doc), {"ctr"})


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("scenes: {default: {}}\nscenes: {}\n", "'scenes' appears twice"),
        ("scenes: [\n", "cannot read ranking config"),
        ("- 1\n", "expected a mapping with key 'scenes'"),
    ],
)
def test_file_level_errors(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RankingConfigError, match=needle) as info:
        load_ranking_config(path, OUTPUTS)
    assert str(info.value).startswith(f"{path}: ")


def test_fusion_file_relative_to_the_yaml(tmp_path: Path) -> None:
    save_fusion_file(
        FusionConfig(formula="ctr ** a * rule_weight", params={"a": 2.0}),
        tmp_path / "fusion" / "home.yaml",
    )
    doc = edited("scenes.home.fusion_file", "fusion/home.yaml")
    cfg = load_ranking_config(write(tmp_path, doc), OUTPUTS)
    home = cfg.scene("home")
    assert home.fusion is not None and home.fusion.params == {"a": 2.0}
    got = cfg.formula("home").evaluate({"ctr": np.array([3.0]), "rule_weight": 0.5}, 1)
    np.testing.assert_allclose(got, [4.5])


def test_fusion_file_errors_name_both_files(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("formula: ctr * nope\n")
    (tmp_path / "broken.yaml").write_text("formula: ctr\nparams: {a: 1}\nextra: 1\n")
    path = write(tmp_path, edited("scenes.home.fusion_file", "bad.yaml"))
    with pytest.raises(RankingConfigError) as info:
        load_ranking_config(path, OUTPUTS)
    msg = str(info.value)
    assert msg.startswith(
        f"{path}: scenes.home.fusion_file (bad.yaml).fusion.formula: unknown name 'nope'"
    )
    path = write(tmp_path, edited("scenes.home.fusion_file", "broken.yaml"))
    with pytest.raises(
        RankingConfigError, match=r"scenes\.home\.fusion_file: .*broken\.yaml: extra: unknown key"
    ):
        load_ranking_config(path, OUTPUTS)
    path = write(tmp_path, edited("scenes.home.fusion_file", "missing.yaml"))
    with pytest.raises(
        RankingConfigError, match=r"scenes\.home\.fusion_file: .*missing\.yaml: cannot read"
    ):
        load_ranking_config(path, OUTPUTS)


def test_scene_rules_drive_rerank(tmp_path: Path) -> None:
    cfg = load_ranking_config(write(tmp_path, BASE), OUTPUTS)
    n = 4
    attrs = np.zeros(
        n,
        dtype=[
            ("category", "<i4"),
            ("brand", "<i4"),
            ("exposure_cap", "<i4"),
            ("promoted", "u1"),
            ("quality", "<f4"),
            ("first_seen_day", "<i4"),
        ],
    )
    attrs["category"] = [1, 1, 2, 3]
    attrs["brand"] = [1, 1, 1, 1]
    attrs["exposure_cap"] = -1
    attrs["quality"] = 1.0
    scores = np.array([4.0, 3.0, 2.0, 1.0])
    home = rerank(scores, attrs, None, cfg.scene("home").rules, n, TODAY)
    default = rerank(scores, attrs, None, cfg.scene("default").rules, n, TODAY)
    assert home.order.tolist() == [
        0,
        1,
        2,
        3,
    ]  # brand window 6, max 2: third brand-1 item is fallback
    assert home.counts["diversity_fallback"] == 2
    assert default.order.tolist() == [0, 2, 3, 1]  # category window 4, max 1


# ---------------------------------------------------------------- exposure caps
CONFIGURATION_MD = Path(service.__file__).parents[1] / "docs" / "configuration.md"


def test_exposure_cap_policies_and_a_null_default_cap(tmp_path: Path) -> None:
    cap = {"default_daily_cap": None, "on_store_failure": "fail_closed"}
    cfg = load_ranking_config(
        write(tmp_path, edited("scenes.home.rules.exposure_cap", cap)), OUTPUTS
    )
    home = cfg.scene("home").rules.exposure_cap
    assert (home.default_daily_cap, home.on_store_failure) == (None, "fail_closed")
    assert cfg.scene("default").rules.exposure_cap.on_store_failure == "fail_open"


@pytest.mark.parametrize(
    ("cfg", "caps"),
    [
        (ExposureCap(default_daily_cap=5), [3, 5, 0]),
        (ExposureCap(default_daily_cap=None), [3, -1, 0]),  # null: only own caps hold
        (ExposureCap(enabled=False), [-1, -1, -1]),  # disabled: nothing is capped
    ],
)
def test_item_caps_are_what_the_reservation_enforces(cfg: ExposureCap, caps: list[int]) -> None:
    own = np.array([3, -1, 0], dtype=np.int32)
    assert item_caps(own, cfg).tolist() == caps
    # The soft check agrees: an uncapped item is never filtered, however often it was shown.
    exposures = np.array([2, 10**9, 0])
    attrs = {"exposure_cap": own, "promoted": np.zeros(3)}
    capped = rerank(np.ones(3), attrs, exposures, RulesConfig(exposure_cap=cfg), 3, TODAY).capped
    assert (~capped).tolist() == [c < 0 or e < c for e, c in zip(exposures, caps, strict=True)]


def test_the_documented_exposure_cap_example_loads_and_each_policy_is_documented(
    tmp_path: Path,
) -> None:
    text = CONFIGURATION_MD.read_text(encoding="utf-8")
    (example,) = re.findall(r"<!-- example: rule-exposure-cap -->\s*```yaml\n(.*?)```", text, re.S)
    doc = edited("scenes.home.rules", yaml.safe_load(example))
    cap = load_ranking_config(write(tmp_path, doc), OUTPUTS).scene("home").rules.exposure_cap
    assert cap == ExposureCap(default_daily_cap=500, on_store_failure="fail_open")
    table = text.split("<!-- table: on-store-failure -->", 1)[1].strip().splitlines()
    rows = itertools.takewhile(lambda line: line.startswith("|"), table[2:])  # header, rule
    documented = {re.findall(r"`([a-z_]+)`", row)[0] for row in rows}
    policies = set(typing.get_args(ExposureCap.model_fields["on_store_failure"].annotation))
    assert documented == policies == {"fail_open", "fail_closed"}
