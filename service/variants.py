"""What each request is scored with: the scene's models, fusion and rules, changed by its arms.

:func:`compile_plan` turns a ranking config's experiments and shadows into a :class:`Plan`, once
per (models, config) pair, before anything is swapped in (service/serving_state.py). Every arm
combination a request can draw in a scene is compiled up front into a :class:`Variant`, so a
request only hashes its user id once per experiment and looks its variant up. Compiling loads the
model and LTR versions the arms and shadows name (:class:`VersionCache`, each version once) and
checks every combination: models that read other features than the served ones, a fusion naming
an output its models lack, an LTR model whose inputs they do not produce, an unknown version.
Each failure is a :class:`~service.ranking_config.RankingConfigError` naming the key, and the
previous plan keeps serving.

**Learned fusion** (``{type: model}``): the LTR score ranks; the boosts and demotions act on it as
on a formula's product, ``score = ltr + log(rule_weight)`` (= multiplying ``exp(ltr)``), so a
scene's rules mean the same under either fusion type.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from mtrank.attributes import ITEM_ATTRIBUTES
from mtrank.fusion import RULE_WEIGHT, FusionConfig, FusionError, ModelFusion, sanitize_scores
from mtrank.registry import ModelVersion, Registry
from mtrank.yamlio import KeyedError
from service.experiments import ExperimentConfig, ShadowConfig, Splitter, parse_model_ref
from service.fusion_model import LtrRuntime
from service.ranking_config import DEFAULT_SCENE, RankingConfig, RulesConfig, fusion_of
from service.runtime import ModelBundle, ModelRuntime, inputs_of

log = logging.getLogger("mtrank.variants")
MAX_COMBINATIONS = 256  # arm combinations per scene: beyond this the config is refused


class Fused(Protocol):
    """A compiled fusion: a formula (mtrank.fusion.Formula) or a learned one (LtrFusion)."""

    names: frozenset[str]

    def evaluate(self, env: Mapping[str, Any], n: int) -> np.ndarray: ...

    def factors(self, env: Mapping[str, Any], n: int) -> dict[str, np.ndarray]: ...


class LtrFusion:
    """An LTR version as a fusion: ``ltr(inputs) + log(rule_weight)``, non-finite -> -inf."""

    def __init__(self, runtime: LtrRuntime) -> None:
        self.runtime = runtime
        self.names = frozenset(runtime.inputs) | {RULE_WEIGHT}
        self.text = f"ltr:{runtime.model.name}@{runtime.model.version}"

    def _parts(self, env: Mapping[str, Any], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        features = self.runtime.features(env, n)  # (n, F)
        learned = self.runtime.score_features(features)  # (n,)
        weight = np.broadcast_to(np.asarray(env[RULE_WEIGHT], dtype=np.float64), (n,))
        return features, learned, weight

    def evaluate(self, env: Mapping[str, Any], n: int) -> np.ndarray:
        _, learned, weight = self._parts(env, n)
        with np.errstate(divide="ignore"):
            return sanitize_scores(learned + np.log(weight))

    def factors(self, env: Mapping[str, Any], n: int) -> dict[str, np.ndarray]:
        """Explain: each input column as the model saw it, the learned score, the rule weight."""
        features, learned, weight = self._parts(env, n)
        out = {
            name: features[:, j].astype(np.float64) for j, name in enumerate(self.runtime.inputs)
        }
        out["ltr_score"] = learned
        out[RULE_WEIGHT] = np.asarray(weight, dtype=np.float64)
        return out


# ------------------------------------------------------------------ versions
class VersionCache:
    """Model and LTR versions named by arms and shadows, loaded once each and shared.

    ``NAME`` resolves to the version ``current`` names now; ``NAME@VERSION`` is pinned.
    :meth:`retain` drops what the newest plan no longer uses.
    """

    def __init__(
        self,
        registry: Registry,
        load_model: Callable[[Any], ModelRuntime],
        ltr_threads: int = 1,
    ) -> None:
        self.registry = registry
        self._load_model = load_model
        self._ltr_threads = ltr_threads
        self._models: dict[tuple[str, str], ModelRuntime] = {}
        self._ltrs: dict[tuple[str, str], LtrRuntime] = {}
        self._lock = threading.Lock()

    def resolve(self, ref: str) -> tuple[str, str]:
        name, version = parse_model_ref(ref)
        if version is None:
            current = self.registry.current(name)
            if current is None:
                raise KeyedError(f"model {name!r} has no current version in {self.registry.root}")
            version = current
        return name, version

    def model(self, ref: str) -> ModelRuntime:
        key = self.resolve(ref)
        with self._lock:
            rt = self._models.get(key)
        if rt is None:
            try:
                rt = self._load_model(self.registry.resolve(*key))
            except Exception as e:  # registry and load errors alike: the config is refused
                raise KeyedError(f"cannot load model {key[0]}@{key[1]}: {e}") from e
            with self._lock:
                self._models[key] = rt
        return rt

    def ltr(self, ref: str) -> LtrRuntime:
        key = self.resolve(ref)
        with self._lock:
            rt = self._ltrs.get(key)
        if rt is None:
            try:
                rt = LtrRuntime.load(self.registry.resolve(*key), self._ltr_threads)
            except Exception as e:
                raise KeyedError(f"cannot load LTR model {key[0]}@{key[1]}: {e}") from e
            with self._lock:
                self._ltrs[key] = rt
        return rt

    def retain(self, models: Iterable[tuple[str, str]], ltrs: Iterable[tuple[str, str]]) -> None:
        keep_m, keep_l = set(models), set(ltrs)
        with self._lock:
            self._models = {k: v for k, v in self._models.items() if k in keep_m}
            self._ltrs = {k: v for k, v in self._ltrs.items() if k in keep_l}

    def currents(self, names: Iterable[str]) -> tuple[tuple[str, str | None], ...]:
        """What ``current`` names now for each unpinned name (the config watcher compares it)."""
        return tuple((n, self.registry.current(n)) for n in sorted(set(names)))


# ------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Variant:
    """One way a request is scored: models, fusion, rules, and the arms that chose them."""

    bundle: ModelBundle
    fusion: Fused
    rules: RulesConfig
    arms: tuple[tuple[str, str], ...]  # (experiment, arm), in config order


@dataclass(frozen=True)
class ShadowSpec:
    """What a shadow process needs to rebuild a shadow by itself: picklable, no sessions.

    ``fusion`` is the formula's config, or the resolved LTR version of a learned fusion.
    """

    models: tuple[ModelVersion, ...]
    fusion: FusionConfig | ModelVersion
    request_fields: tuple[str, ...]


@dataclass(frozen=True)
class CompiledShadow:
    """A shadow as one scene runs it: checked here, scored in the shadow process."""

    config: ShadowConfig
    bundle: ModelBundle
    fusion: Fused
    spec: ShadowSpec


@dataclass
class _Scene:
    splitters: list[Splitter]
    variants: dict[tuple[int, ...], Variant]  # arm index per splitter -> variant
    shadows: list[CompiledShadow]


@dataclass
class Plan:
    """Experiments and shadows of one (models, ranking config) pair, compiled."""

    scenes: dict[str, _Scene]
    arms: dict[str, tuple[str, ...]]  # experiment -> its arm names (for the QA header)
    unpinned: frozenset[str] = field(default_factory=frozenset)  # names resolved via current

    def variant(self, scene: str, user_id: str, forced: Mapping[str, str] | None = None) -> Variant:
        """The request's variant: one hash per experiment of the scene (or a forced arm)."""
        s = self.scenes[scene]
        if not s.splitters:
            return s.variants[()]
        key = []
        for sp in s.splitters:
            arm = forced.get(sp.experiment) if forced else None
            key.append(sp.arms.index(arm) if arm is not None else sp.arm(user_id))
        return s.variants[tuple(key)]

    def shadows(self, scene: str) -> list[CompiledShadow]:
        return self.scenes[scene].shadows


def _bundle(base: ModelBundle, refs: Sequence[str], cache: VersionCache) -> ModelBundle:
    """``base`` with the named models replaced by the referenced versions."""
    if not refs:
        return base
    served = {rt.model.name: i for i, rt in enumerate(base.runtimes)}
    runtimes = list(base.runtimes)
    for ref in refs:
        name, version = cache.resolve(ref)
        if name not in served:
            raise KeyedError(
                f"model {name!r} is not served (served: {', '.join(served)}); an arm or shadow "
                "replaces a served model with another version of it"
            )
        i = served[name]
        if runtimes[i].model.version == version:
            continue
        rt = cache.model(ref)
        if inputs_of(rt.spec) != inputs_of(base.spec):
            raise KeyedError(
                f"model {name}@{version} reads other features than the served {name}@"
                f"{runtimes[i].model.version}: one snapshot feeds every variant"
            )
        runtimes[i] = rt
    return ModelBundle(tuple(runtimes))


def _inputs(bundle: ModelBundle, request_fields: Sequence[str]) -> frozenset[str]:
    return (
        frozenset(bundle.output_names)
        | frozenset(request_fields)
        | frozenset(ITEM_ATTRIBUTES.formula_names)
        | {RULE_WEIGHT}
    )


class _Compiler:
    def __init__(
        self, config: RankingConfig, base: ModelBundle, fields: Sequence[str], cache: VersionCache
    ) -> None:
        self.config, self.base, self.fields, self.cache = config, base, fields, cache
        self._fused: dict[tuple[int, tuple[str, ...]], Fused] = {}
        self.used_ltr: set[tuple[str, str]] = set()
        self.used_models: set[tuple[str, str]] = set()

    def fusion(self, spec: FusionConfig | ModelFusion, bundle: ModelBundle) -> Fused:
        versions = tuple(f"{n}@{v}" for n, v in bundle.versions.items())
        key = (id(spec), versions)
        cached = self._fused.get(key)
        if cached is not None:
            return cached
        inputs = _inputs(bundle, self.fields)
        fused: Fused
        if isinstance(spec, ModelFusion):
            try:
                runtime = self.cache.ltr(spec.model)
            except KeyedError as e:
                raise KeyedError(e.detail, key="model") from e
            self.used_ltr.add((runtime.model.name, runtime.model.version))
            missing = sorted(set(runtime.inputs) - inputs)
            if missing:
                raise KeyedError(
                    f"LTR model {runtime.model.name}@{runtime.model.version} reads {missing}, "
                    f"which the models ({', '.join(versions)}) and the request do not produce",
                    key="model",
                )
            fused = LtrFusion(runtime)
        else:
            try:
                fused = spec.compile(inputs)
            except FusionError as e:
                raise KeyedError(e.detail, key=e.key or "formula") from e
        self._fused[key] = fused
        return fused

    def bundle(self, refs: Sequence[str]) -> ModelBundle:
        b = _bundle(self.base, refs, self.cache)
        self.used_models.update((rt.model.name, rt.model.version) for rt in b.runtimes)
        return b


def _rules_need_weight(rules: RulesConfig, fused: Fused) -> bool:
    return bool(rules.boosts or rules.demotions) and RULE_WEIGHT not in fused.names


def _scene_variants(
    comp: _Compiler, scene: str, experiments: list[tuple[int, ExperimentConfig]]
) -> dict[tuple[int, ...], Variant]:
    config = comp.config
    choices = [range(len(e.arms)) for _, e in experiments]
    combos = list(itertools.product(*choices))
    if len(combos) > MAX_COMBINATIONS:
        raise KeyedError(
            f"scene {scene!r} has {len(combos)} arm combinations (at most {MAX_COMBINATIONS})",
            key="experiments",
        )
    out: dict[tuple[int, ...], Variant] = {}
    for combo in combos:
        refs: list[str] = []
        profile, fusion_spec, where = scene, None, f"scenes.{scene}.fusion"
        models_where = "the served models"
        for (i, e), j in zip(experiments, combo, strict=True):
            arm = e.arms[j]
            if arm.models:
                refs, models_where = arm.models, f"experiments[{i}].arms[{j}].models"
            if arm.scene is not None:
                profile, where = arm.scene, f"experiments[{i}].arms[{j}].scene ({arm.scene})"
            if arm.fusion is not None:
                fusion_spec, where = arm.fusion, f"experiments[{i}].arms[{j}].fusion"
        try:
            bundle = comp.bundle(refs)
        except KeyedError as e:
            raise KeyedError(e.detail, key=models_where) from e
        spec = fusion_spec if fusion_spec is not None else fusion_of(config, profile)
        try:
            fused = comp.fusion(spec, bundle)
        except KeyedError as e:
            detail = (
                e.detail
                if models_where == "the served models"
                else (f"{e.detail} (with {models_where})")
            )
            raise KeyedError(detail, key=f"{where}.{e.key}" if e.key else where) from e
        rules = config.scenes[profile].rules
        if _rules_need_weight(rules, fused):
            raise KeyedError(
                f"boosts/demotions are configured but the fusion of {where} does not use "
                f"{RULE_WEIGHT}, so they would have no effect",
                key=f"scenes.{profile}.rules",
            )
        arms = tuple((e.name, e.arms[j].name) for (_, e), j in zip(experiments, combo, strict=True))
        out[tuple(combo)] = Variant(bundle, fused, rules, arms)
    return out


def _scene_shadows(comp: _Compiler, scene: str) -> list[CompiledShadow]:
    out = []
    for i, sh in enumerate(comp.config.shadows):
        if sh.scenes is not None and scene not in sh.scenes:
            continue
        try:
            bundle = comp.bundle(sh.models)
        except KeyedError as e:
            raise KeyedError(e.detail, key=f"shadows[{i}].models") from e
        spec = sh.fusion if sh.fusion is not None else fusion_of(comp.config, scene)
        where = f"shadows[{i}].fusion" if sh.fusion is not None else f"scenes.{scene}.fusion"
        try:
            fused = comp.fusion(spec, bundle)
        except KeyedError as e:
            raise KeyedError(f"{e.detail} (shadow {sh.name!r})",
                             key=f"{where}.{e.key}" if e.key else where) from e  # fmt: skip
        source = fused.runtime.model if isinstance(fused, LtrFusion) else spec
        assert isinstance(source, FusionConfig | ModelVersion)
        models = tuple(rt.model for rt in bundle.runtimes)
        shadow_spec = ShadowSpec(models, source, tuple(comp.fields))
        out.append(CompiledShadow(sh, bundle, fused, shadow_spec))
    return out


def _unpinned(config: RankingConfig) -> frozenset[str]:
    refs: list[str] = []
    specs: list[Any] = [s.fusion for s in config.scenes.values()]
    for e in config.experiments:
        for a in e.arms:
            refs += a.models
            specs.append(a.fusion)
    for sh in config.shadows:
        refs += sh.models
        specs.append(sh.fusion)
    refs += [s.model for s in specs if isinstance(s, ModelFusion)]
    return frozenset(parse_model_ref(r)[0] for r in refs if parse_model_ref(r)[1] is None)


def compile_plan(
    config: RankingConfig, base: ModelBundle, request_fields: Sequence[str], cache: VersionCache
) -> Plan:
    """Every scene's variants and shadows; raises KeyedError naming the config key."""
    comp = _Compiler(config, base, request_fields, cache)
    scenes: dict[str, _Scene] = {}
    for scene in config.scenes:
        applicable = [
            (i, e) for i, e in enumerate(config.experiments)
            if e.scenes is None or scene in e.scenes
        ]  # fmt: skip
        variants = _scene_variants(comp, scene, applicable)
        scenes[scene] = _Scene(
            [Splitter.of(e) for _, e in applicable], variants, _scene_shadows(comp, scene)
        )
    cache.retain(comp.used_models, comp.used_ltr)
    arms = {e.name: tuple(a.name for a in e.arms) for e in config.experiments}
    return Plan(scenes, arms, _unpinned(config))


__all__ = [
    "DEFAULT_SCENE",
    "CompiledShadow",
    "ShadowSpec",
    "Fused",
    "LtrFusion",
    "Plan",
    "Variant",
    "VersionCache",
    "compile_plan",
]
