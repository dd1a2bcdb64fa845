"""Per-scene ranking configuration: the fusion formula and the re-rank rules of each scene.

One YAML file (default: ``service/config/ranking.yaml``) maps scene names to a
:class:`SceneConfig`. Everything is checked when the file is loaded, before the service takes
traffic: an unknown key, a bad value or a formula that does not compile stops start-up with a
:class:`RankingConfigError` naming the file and the key path, e.g.
``ranking.yaml: scenes.home.rules.diversity[0].window: must be >= 1``.

Names a formula may use (:func:`load_ranking_config`):

* the names the caller passes as ``allowed_names``: the model's task outputs (and any request
  fields the pipeline supplies). A formula using an output the model does not have (``stay`` on
  a model without a stay task) is a load-time error, never a silent 1: a silently missing term
  would change the ranking without anyone noticing;
* the item attributes marked ``formula`` in :data:`mtrank.attributes.ITEM_ATTRIBUTES` (``price``,
  ``quality``, ``promoted``);
* ``rule_weight``: the product of the scene's boost/demotion multipliers (service/rules.py);
* the scene's fusion ``params``, folded in as constants.

A scene without ``fusion``/``fusion_file`` uses the ``default`` scene's fusion; ``default`` is
required and is what a request without a scene gets. A scene's fusion is a formula or, with
``{type: model, model: NAME}``, a learned (LTR) model: that one is checked when the service
compiles the config against its models (service/variants.py), as are the ``experiments`` and
``shadows`` lists (service/experiments.py), whose cross-references are checked here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    PrivateAttr,
    field_validator,
    model_validator,
)

from mtrank.attributes import ITEM_ATTRIBUTES
from mtrank.fusion import (
    RULE_WEIGHT,
    Formula,
    FusionConfig,
    FusionError,
    FusionSpec,
    ModelFusion,
    load_fusion_file,
)
from mtrank.yamlio import KeyedError, load_yaml_model
from service.experiments import ExperimentConfig, ShadowConfig, check_references

DEFAULT_SCENE = "default"
DEFAULT_RECALL_K = 500


class RankingConfigError(ValueError):
    """The ranking config does not load; the message starts with ``FILE: key.path:``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _known_attribute(field: str, allowed: Iterable[str]) -> str:
    allowed = sorted(allowed)
    if field not in allowed:
        raise ValueError(f"unknown item attribute {field!r} (known: {', '.join(allowed)})")
    return field


class ExposureCap(_Strict):
    """Daily exposure cap: items shown ``cap`` times today are not ranked again today.

    An item's cap is its own ``exposure_cap`` attribute when >= 0, else ``default_daily_cap``;
    ``default_daily_cap: null`` leaves items without their own cap uncapped. ``enabled: false``
    caps nothing (exposures are still counted).

    ``on_store_failure`` says what a request serves when the exposure reservation cannot be made
    (the store is down or timed out):

    * ``fail_open``: the ranked items, unreserved. Availability first: a cap can be exceeded by
      what is served while reservations fail (counted in ``mtrank_exposures_uncounted_total``).
    * ``fail_closed``: only items without a cap; capped items are withheld (dropped with reason
      ``exposure_cap_unreserved``) and their slots refilled from uncapped items, so a cap is
      never exceeded. With every item capped, the answer is empty during the outage.
    """

    enabled: bool = True
    default_daily_cap: int | None = Field(
        10_000, ge=1, description="cap of items whose own cap is < 0; null: those are uncapped"
    )
    on_store_failure: Literal["fail_open", "fail_closed"] = "fail_open"
    count_on: Literal["served", "impression"] = Field(
        "served", description="what counts an exposure: a returned item, or an impression event"
    )


class Condition(_Strict):
    """One test on an item attribute. ``within_days``: ``0 <= today - value_of_field < value``.

    ``in`` takes a list; every other op takes one number. Comparisons are in float64.
    """

    field: str
    op: Literal["eq", "ne", "lt", "le", "gt", "ge", "in", "within_days"]
    value: FiniteFloat | list[FiniteFloat]

    @field_validator("field")
    @classmethod
    def _field(cls, v: str) -> str:
        return _known_attribute(v, ITEM_ATTRIBUTES.rule_fields)

    @model_validator(mode="after")
    def _value_fits_op(self) -> Condition:
        if (self.op == "in") != isinstance(self.value, list):
            want = "a list" if self.op == "in" else "a single number"
            raise ValueError(f"op {self.op!r} takes {want} as value")
        if self.op == "within_days":
            if self.field not in ITEM_ATTRIBUTES.integer_rule_fields:
                raise ValueError(f"within_days needs an integer day field, not {self.field!r}")
            if not (isinstance(self.value, float) and self.value >= 1):
                raise ValueError("within_days needs a value >= 1 (days)")
        return self


class _Rule(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    when: list[Condition] = Field(min_length=1, description="all must hold")
    multiplier: float


class Boost(_Rule):
    """Multiply the rule weight of matching items by ``multiplier`` (>= 1)."""

    multiplier: float = Field(ge=1.0, allow_inf_nan=False)


class Demotion(_Rule):
    """Multiply the rule weight of matching items by ``multiplier`` (in (0, 1])."""

    multiplier: float = Field(gt=0.0, le=1.0)


class DiversityConstraint(_Strict):
    """In any ``window`` consecutive output positions at most ``max_count`` share ``field``."""

    field: str
    window: int = Field(ge=1)
    max_count: int = Field(ge=1)

    @field_validator("field")
    @classmethod
    def _field(cls, v: str) -> str:
        return _known_attribute(v, ITEM_ATTRIBUTES.integer_rule_fields)


class RulesConfig(_Strict):
    """Re-rank rules of one scene, applied in the order documented in service/rules.py."""

    exposure_cap: ExposureCap = ExposureCap()
    boosts: list[Boost] = []
    demotions: list[Demotion] = []
    diversity: list[DiversityConstraint] = []

    @model_validator(mode="after")
    def _unique_names(self) -> RulesConfig:
        names = [r.name for r in [*self.boosts, *self.demotions]]
        dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if dup is not None:
            raise ValueError(f"rule name {dup!r} is used twice (boosts and demotions share names)")
        return self


class RecallConfig(_Strict):
    """``POST /recommend``: how many candidates the recall stage hands to the ranker."""

    k: int = Field(DEFAULT_RECALL_K, ge=1, description="capped at MTRANK_MAX_CANDIDATES")


class SceneConfig(_Strict):
    """One scene: fusion inline or in a file (relative to the YAML), its rules, its recall k."""

    fusion: FusionSpec | None = None
    fusion_file: str | None = None
    rules: RulesConfig = RulesConfig()
    recall: RecallConfig | None = None  # None: the default scene's, else DEFAULT_RECALL_K

    @model_validator(mode="after")
    def _one_fusion(self) -> SceneConfig:
        if self.fusion is not None and self.fusion_file is not None:
            raise ValueError("give fusion or fusion_file, not both")
        return self


class RankingConfig(_Strict):
    """All scenes; build it with :func:`load_ranking_config` so the formulas are compiled."""

    scenes: dict[str, SceneConfig]
    experiments: list[ExperimentConfig] = []
    shadows: list[ShadowConfig] = []
    _formulas: dict[str, Formula] = PrivateAttr(default_factory=dict)

    @field_validator("scenes")
    @classmethod
    def _has_default(cls, v: dict[str, SceneConfig]) -> dict[str, SceneConfig]:
        if DEFAULT_SCENE not in v:
            raise ValueError(f"a scene named {DEFAULT_SCENE!r} is required")
        return v

    @model_validator(mode="after")
    def _references(self) -> RankingConfig:
        check_references(self.experiments, self.shadows, self.scenes)
        modes = {n: s.rules.exposure_cap.count_on for n, s in self.scenes.items()}
        if len(set(modes.values())) > 1:
            first = next(iter(modes.values()))
            odd = next(n for n, m in modes.items() if m != first)
            raise KeyedError(
                f"count_on is {modes[odd]!r} here but {first!r} elsewhere: the counters are per "
                "item and day, shared by every scene, so one config counts one way",
                key=f"scenes.{odd}.rules.exposure_cap.count_on",
            )
        return self

    @property
    def count_on(self) -> str:
        """What counts exposures for every scene: ``served`` or ``impression``."""
        return self.scenes[DEFAULT_SCENE].rules.exposure_cap.count_on

    def scene(self, name: str | None) -> SceneConfig:
        """The scene's config; ``None`` means the default scene. Unknown names raise KeyError."""
        key = DEFAULT_SCENE if name is None else name
        if key not in self.scenes:
            raise KeyError(f"unknown scene {key!r} (known: {', '.join(sorted(self.scenes))})")
        return self.scenes[key]

    def recall_k(self, name: str | None) -> int:
        """Candidates /recommend recalls for the scene (its own, the default's, or 500)."""
        recall = self.scene(name).recall or self.scenes[DEFAULT_SCENE].recall
        return recall.k if recall is not None else DEFAULT_RECALL_K

    def formula(self, name: str | None) -> Formula:
        """The scene's compiled formula (compiled once, at load); KeyError for a learned one."""
        key = DEFAULT_SCENE if name is None else name
        self.scene(key)
        if key not in self._formulas:
            if isinstance(fusion_of(self, key), ModelFusion):
                raise KeyError(f"scene {key!r} uses a learned fusion (service/variants.py)")
            raise RuntimeError("formulas are compiled by load_ranking_config / compile_formulas")
        return self._formulas[key]

    def compile_formulas(self, inputs: Iterable[str]) -> None:
        """Compile every scene's formula fusion against ``inputs``; raises FusionError."""
        self._formulas = {
            n: f.compile(inputs)
            for n in self.scenes
            if isinstance(f := fusion_of(self, n), FusionConfig)
        }


def fusion_of(config: RankingConfig, scene: str) -> FusionConfig | ModelFusion:
    """The scene's fusion: its own, else the default scene's."""
    fusion = config.scenes[scene].fusion or config.scenes[DEFAULT_SCENE].fusion
    if fusion is None:
        raise FusionError(f"scenes.{DEFAULT_SCENE}: needs fusion or fusion_file")
    return fusion


def _resolve_files(config: RankingConfig, path: Path) -> RankingConfig:
    scenes = dict(config.scenes)
    for name, scene in config.scenes.items():
        if scene.fusion_file is None:
            continue
        try:
            fusion = load_fusion_file(path.parent / scene.fusion_file)
        except FusionError as e:
            raise RankingConfigError(f"{path}: scenes.{name}.fusion_file: {e}") from e
        scenes[name] = scene.model_copy(update={"fusion": fusion})
    if scenes[DEFAULT_SCENE].fusion is None:
        raise RankingConfigError(f"{path}: scenes.{DEFAULT_SCENE}: needs fusion or fusion_file")
    return config.model_copy(update={"scenes": scenes})


def _compile(config: RankingConfig, path: Path, inputs: frozenset[str]) -> None:
    formulas: dict[str, Formula] = {}
    for name, scene in config.scenes.items():
        own = scene.fusion is not None
        where = f"scenes.{name}" if own else f"scenes.{DEFAULT_SCENE} (used by scene {name!r})"
        if scene.fusion_file is not None:
            where += f".fusion_file ({scene.fusion_file})"
        fusion = fusion_of(config, name)
        if isinstance(fusion, ModelFusion):
            continue  # a learned fusion: compiled with the models (service/variants.py)
        try:
            formulas[name] = fusion.compile(inputs)
        except FusionError as e:
            raise RankingConfigError(
                f"{path}: {where}.fusion.{e.key or 'formula'}: {e.detail}"
            ) from e
        rules = scene.rules
        if (rules.boosts or rules.demotions) and RULE_WEIGHT not in formulas[name].names:
            raise RankingConfigError(
                f"{path}: scenes.{name}.rules: boosts/demotions are configured but the formula "
                f"does not use {RULE_WEIGHT}, so they would have no effect"
            )
    config._formulas = formulas


def load_ranking_config(
    path: str | os.PathLike[str], allowed_names: Iterable[str]
) -> RankingConfig:
    """Load, validate and compile a ranking config.

    ``allowed_names`` are the model's output names (plus request fields the pipeline supplies);
    item attributes, ``rule_weight`` and each scene's params are added here.
    """
    path = Path(path)
    config = load_yaml_model(
        path, RankingConfig, RankingConfigError, "ranking config",
        "expected a mapping with key 'scenes'",
    )  # fmt: skip
    config = _resolve_files(config, path)
    inputs = frozenset(allowed_names) | set(ITEM_ATTRIBUTES.formula_names) | {RULE_WEIGHT}
    _compile(config, path, inputs)
    return config
