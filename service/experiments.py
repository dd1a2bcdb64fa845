"""Experiments and shadow models in the ranking config: what they say, and who gets which arm.

An **experiment** splits one or more scenes' traffic into **arms** by basis points (1 bp = 0.01%;
an experiment's arms sum to exactly 10,000). Each arm may change, for its share of users:

- ``models``: model versions (``NAME@VERSION``, or ``NAME`` for what ``current`` names), each
  replacing the served model of that name (the arm's models read the same features);
- ``scene``: a scene of this config whose fusion and rules the arm uses (a rules profile);
- ``fusion``: a fusion of its own (a formula, or ``{type: model, model: LTR}``), over the
  scene's.

An arm that sets nothing is the control. **Assignment** is ``blake2b(salt, user_id) mod 10,000``
into the arms' cumulative bp ranges: deterministic, so one user gets the same arm from every
worker and replica, and stable while the split stays the same (growing an arm moves only users of
the bucket range that changes hands). The salt defaults to the layer's name.

**Layers** make independent experiments overlap orthogonally: each layer hashes with its own
salt, so a user's arm in one layer says nothing about their arm in another. Two experiments of
one layer must not share a scene (a request is in at most one experiment per layer); two layers
must not both change the same thing (models, scene or fusion) of a scene, or one would silently
override the other. Both are load-time errors naming the key.

A **shadow** scores a sample of live requests with other model versions (and optionally another
fusion) after the response is computed: service/shadow.py. It never changes what is served.

The header ``X-Mtrank-Arm: EXPERIMENT=ARM[, EXPERIMENT=ARM]`` forces arms (QA); an unknown
experiment or arm is a 422 naming the header.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mtrank.fusion import MODEL_REF, FusionSpec
from mtrank.yamlio import KeyedError
from service.errors import InvalidRequest

TOTAL_BP = 10_000
ARM_HEADER = "x-mtrank-arm"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
ASPECTS = ("models", "scene", "fusion")  # what an arm may change


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """``NAME`` -> (NAME, None); ``NAME@VERSION`` -> (NAME, VERSION)."""
    name, _, version = ref.partition("@")
    return name, (version or None)


def _check_refs(refs: list[str]) -> list[str]:
    for ref in refs:
        if not re.match(MODEL_REF, ref):
            raise ValueError(f"{ref!r} is not NAME or NAME@VERSION")
    names = [parse_model_ref(r)[0] for r in refs]
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise ValueError(f"model {dup!r} is named twice")
    return refs


class ArmConfig(_Strict):
    """One arm: its share and what it changes (nothing: the control)."""

    name: str = Field(pattern=_NAME)
    bp: int = Field(ge=0, le=TOTAL_BP, description="share of the experiment's traffic, 0.01% units")
    models: list[str] = Field(default_factory=list, description="NAME or NAME@VERSION each")
    scene: str | None = Field(None, description="the scene whose fusion and rules this arm uses")
    fusion: FusionSpec | None = None

    @field_validator("models")
    @classmethod
    def _refs(cls, v: list[str]) -> list[str]:
        return _check_refs(v)

    def changes(self) -> set[str]:
        """Which of ASPECTS this arm sets."""
        out = set()
        if self.models:
            out.add("models")
        if self.scene is not None:
            out.add("scene")
        if self.fusion is not None:
            out.add("fusion")
        return out


class ExperimentConfig(_Strict):
    """A named experiment: its layer, salt, scenes and arms (module docstring)."""

    name: str = Field(pattern=_NAME)
    layer: str | None = Field(None, pattern=_NAME, description="default: the experiment's name")
    salt: str | None = Field(None, min_length=1, description="default: the layer's name")
    scenes: list[str] | None = Field(None, min_length=1, description="default: every scene")
    arms: list[ArmConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _split(self) -> ExperimentConfig:
        total = sum(a.bp for a in self.arms)
        if total != TOTAL_BP:
            raise KeyedError(f"the arms' bp sum to {total}, not {TOTAL_BP}", key="arms")
        names = [a.name for a in self.arms]
        dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if dup is not None:
            raise KeyedError(f"arm {dup!r} is named twice", key="arms")
        return self

    @property
    def layer_name(self) -> str:
        return self.layer or self.name

    @property
    def salt_text(self) -> str:
        return self.salt or self.layer_name


class ShadowConfig(_Strict):
    """A shadow: other model versions (and optionally another fusion) scored after the response.

    ``sample_bp`` of the scenes' requests are shadowed; ``log_sample_bp`` of those are written to
    the ``mtrank.shadow`` log with both top-k lists. ``timeout_ms`` bounds one shadow run; it
    never delays the response, which is sent first.
    """

    name: str = Field(pattern=_NAME)
    models: list[str] = Field(min_length=1, description="NAME or NAME@VERSION each")
    fusion: FusionSpec | None = None
    scenes: list[str] | None = Field(None, min_length=1, description="default: every scene")
    sample_bp: int = Field(TOTAL_BP, ge=0, le=TOTAL_BP)
    top_k: int = Field(20, ge=2, le=1000, description="rank agreement over the live top-k")
    timeout_ms: float = Field(200.0, gt=0, le=60_000)
    log_sample_bp: int = Field(100, ge=0, le=TOTAL_BP)

    @field_validator("models")
    @classmethod
    def _refs(cls, v: list[str]) -> list[str]:
        return _check_refs(v)


def _unique(names: list[str], what: str, key: str) -> None:
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise KeyedError(f"{what} {dup!r} is named twice", key=key)


def check_references(
    experiments: Sequence[ExperimentConfig], shadows: Sequence[ShadowConfig], scenes: Iterable[str]
) -> None:
    """Cross-references the models alone cannot check; raises KeyedError naming the key."""
    known = set(scenes)

    def scene_list(where: str, names: list[str] | None) -> set[str]:
        if names is None:
            return set(known)
        for j, s in enumerate(names):
            if s not in known:
                raise KeyedError(f"unknown scene {s!r} (known: {', '.join(sorted(known))})",
                                 key=f"{where}.scenes[{j}]")  # fmt: skip
        return set(names)

    _unique([e.name for e in experiments], "experiment", "experiments")
    layers: dict[str, list[tuple[int, set[str]]]] = {}
    for i, e in enumerate(experiments):
        where = f"experiments[{i}]"
        e_scenes = scene_list(where, e.scenes)
        for j, arm in enumerate(e.arms):
            if arm.scene is not None and arm.scene not in known:
                raise KeyedError(
                    f"unknown scene {arm.scene!r} (known: {', '.join(sorted(known))})",
                    key=f"{where}.arms[{j}].scene",
                )
        for k, other in layers.get(e.layer_name, []):
            if e_scenes & other:
                raise KeyedError(
                    f"shares layer {e.layer_name!r} and scene(s) {sorted(e_scenes & other)} with "
                    f"experiments[{k}] ({experiments[k].name!r}): one layer's experiments must "
                    "cover different scenes",
                    key=f"{where}.layer",
                )
        layers.setdefault(e.layer_name, []).append((i, e_scenes))
    _check_layer_conflicts(experiments, known)
    _unique([s.name for s in shadows], "shadow", "shadows")
    for i, sh in enumerate(shadows):
        scene_list(f"shadows[{i}]", sh.scenes)


def _check_layer_conflicts(experiments: Sequence[ExperimentConfig], known: set[str]) -> None:
    """Two layers changing the same aspect of one scene would override each other: refused."""
    owner: dict[tuple[str, str], tuple[int, str]] = {}  # (scene, aspect) -> (experiment, layer)
    for i, e in enumerate(experiments):
        aspects = set().union(*(a.changes() for a in e.arms))
        for scene in sorted(set(e.scenes) if e.scenes is not None else known):
            for aspect in sorted(aspects):
                prev = owner.get((scene, aspect))
                if prev is not None and prev[1] != e.layer_name:
                    raise KeyedError(
                        f"changes {aspect} of scene {scene!r}, as experiments[{prev[0]}] "
                        f"({experiments[prev[0]].name!r}) in layer {prev[1]!r} does: two layers "
                        "must change different things",
                        key=f"experiments[{i}].arms",
                    )
                owner[(scene, aspect)] = (i, e.layer_name)


# ------------------------------------------------------------------ assignment
def bucket(salt: str, user_id: str) -> int:
    """The user's bucket in [0, 10,000) for ``salt``: the same on every process and host."""
    digest = hashlib.blake2b(user_id.encode(), digest_size=8, key=salt.encode()[:64]).digest()
    return int.from_bytes(digest, "big") % TOTAL_BP


@dataclass(frozen=True)
class Splitter:
    """One experiment's arms as cumulative bucket bounds."""

    experiment: str
    salt: str
    arms: tuple[str, ...]
    bounds: tuple[int, ...]  # bounds[i]: first bucket past arm i

    @classmethod
    def of(cls, e: ExperimentConfig) -> Splitter:
        bounds, acc = [], 0
        for a in e.arms:
            acc += a.bp
            bounds.append(acc)
        return cls(e.name, e.salt_text, tuple(a.name for a in e.arms), tuple(bounds))

    def arm(self, user_id: str) -> int:
        """Index of the user's arm (arms with 0 bp are never drawn, only forced)."""
        return bisect.bisect_right(self.bounds, bucket(self.salt, user_id))


def parse_arm_header(raw: str | None, known: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """``EXP=ARM, EXP2=ARM2`` -> {EXP: ARM}; unknown names are a 422 naming the header."""
    if not raw:
        return {}
    out: dict[str, str] = {}
    for part in raw.split(","):
        exp, sep, arm = (x.strip() for x in part.partition("="))
        if not sep or not exp or not arm:
            raise InvalidRequest(
                f"{ARM_HEADER}: {part.strip()!r} is not EXPERIMENT=ARM", field=ARM_HEADER
            )
        if exp not in known:
            raise InvalidRequest(f"{ARM_HEADER}: unknown experiment {exp!r}", field=ARM_HEADER)
        if arm not in known[exp]:
            raise InvalidRequest(
                f"{ARM_HEADER}: experiment {exp!r} has no arm {arm!r} "
                f"(arms: {', '.join(known[exp])})",
                field=ARM_HEADER,
            )
        out[exp] = arm
    return out
