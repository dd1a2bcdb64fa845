"""A learned-fusion (LTR) version in the registry: the files, the metadata, the checksums.

``mtrank train-ltr`` (training/ltr/) writes it; the service's :class:`service.fusion_model.
LtrRuntime` verifies it before it scores anything. Layout::

    models/NAME/VERSION/ltr.onnx        float32 [N, F] "inputs" -> float32 [N] or [N, 1] score
    models/NAME/VERSION/metadata.json   "kind": "ltr", the ordered input names, the trainer,
                                        the grades, metrics, parity, and ``sha256`` of ltr.onnx

Column ``f`` of the graph's input is the value named ``inputs[f]``. For a fusion model
(``input_space: fusion``) every name is one the fusion formula could read: a task output of the
multi-task model (ctr, cvr, ...), an item attribute marked ``formula`` in
:data:`mtrank.attributes.ITEM_ATTRIBUTES` (price, quality, promoted) or a dense request-context
field. The single-model baseline (``input_space: features``) scores the feature spec's encoded
columns instead, with no multi-task model underneath: it is an offline baseline and cannot be
served as a fusion (:func:`problems` with ``servable=True`` says so).

:func:`resolve`, :func:`publish` and :func:`promote` are :class:`mtrank.registry.Registry`'s
atomic renames, refusing a version (or a build) that holds no ``ltr.onnx``. A version is
published whole and never edited.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mtrank.attributes import ITEM_ATTRIBUTES
from mtrank.registry import (
    LTR_MODEL_FILE,
    METADATA_FILE,
    ModelVersion,
    Registry,
    RegistryError,
    sha256_file,
)
from mtrank.yamlio import validation_message

LTR_KIND: Final = "ltr"
INPUT_NAME: Final = "inputs"  # the graph's one input
CHECKED_FILES: Final = (LTR_MODEL_FILE,)
MAX_GRADE: Final = 30  # LightGBM's lambdarank looks gains up by integer label (31 by default)

Trainer = Literal["lambdamart", "bpr", "single_model"]
InputSpace = Literal["fusion", "features"]

__all__ = [
    "CHECKED_FILES",
    "INPUT_NAME",
    "LTR_KIND",
    "LTR_MODEL_FILE",
    "MAX_GRADE",
    "METADATA_FILE",
    "InputSpace",
    "LtrMetadata",
    "RankerRef",
    "Trainer",
    "checksums",
    "fusion_names",
    "missing_inputs",
    "problems",
    "promote",
    "publish",
    "resolve",
]


class RankerRef(BaseModel):
    """The multi-task model whose outputs a fusion model was trained on."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    version: str
    spec_sha256: str


class LtrMetadata(BaseModel):
    """What metadata.json of an LTR version must say; unknown keys are kept, not checked.

    ``inputs`` is the column order of the graph's input; ``grades`` maps an event (a label
    column, or ``impression`` for a row with none) to its relevance grade; ``label_gain`` is the
    NDCG gain of each grade (index = grade) the model was trained for.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: Literal["ltr"]
    trainer: Trainer
    input_space: InputSpace
    inputs: list[str] = Field(min_length=1)
    input_name: str = INPUT_NAME
    output_name: str
    grades: dict[str, int]
    label_gain: list[float] = Field(min_length=1)
    ranker: RankerRef | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    sha256: dict[str, str]

    @field_validator("inputs")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = sorted({n for n in v if v.count(n) > 1})
        if dup:
            raise ValueError(f"input names must be unique, repeated: {dup}")
        return v

    @field_validator("grades")
    @classmethod
    def _grade_range(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: g for k, g in v.items() if not 0 <= g <= MAX_GRADE}
        if bad:
            raise ValueError(f"grades must lie in [0, {MAX_GRADE}], got {bad}")
        return v

    @classmethod
    def parse(cls, data: Any) -> LtrMetadata:
        """Validate parsed metadata.json; the error names the key (``metadata.json: key: ...``)."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ValueError(f"{METADATA_FILE}: {validation_message(e)}") from e


def fusion_names(outputs: Iterable[str], context: Iterable[str] = ()) -> frozenset[str]:
    """Every name a fusion model may take as an input, given the ranker's outputs and the dense
    request-context fields (``rule_weight`` is not one: it is business policy applied after)."""
    return frozenset(outputs) | frozenset(ITEM_ATTRIBUTES.formula_names) | frozenset(context)


def missing_inputs(inputs: Iterable[str], available: Iterable[str]) -> list[str]:
    """The inputs, in order, that ``available`` (e.g. :func:`fusion_names`) does not provide."""
    have = frozenset(available)
    return [n for n in inputs if n not in have]


def checksums(directory: Path) -> dict[str, str]:
    """sha256 of every file in :data:`CHECKED_FILES` (the ``sha256`` entry of metadata.json)."""
    return {name: sha256_file(Path(directory) / name) for name in CHECKED_FILES}


def problems(directory: Path, metadata: Any, servable: bool = True) -> list[str]:
    """Every way ``directory`` is not the LTR version its metadata describes (empty: fine).

    Each problem names the file or the metadata key. ``servable``: also require a fusion model
    (``input_space: fusion``), the only kind the service can feed.
    """
    try:
        meta = LtrMetadata.parse(metadata)
    except ValueError as e:
        return [str(e)]
    out: list[str] = []
    if servable and meta.input_space != "fusion":
        out.append(
            f"{METADATA_FILE}: input_space is {meta.input_space!r}: a {meta.trainer} model over "
            "the encoded features is an offline baseline, not a fusion the service can feed"
        )
    for name in CHECKED_FILES:
        path = Path(directory) / name
        if not path.is_file():
            out.append(f"{name} is missing")
        elif meta.sha256.get(name) != sha256_file(path):
            out.append(f"{name} does not match its sha256 in {METADATA_FILE}")
    return out


# ---------------------------------------------------------------- registry operations
def resolve(registry: Registry, name: str, version: str | None = None) -> ModelVersion:
    """``name``'s ``version`` (default: ``current``), refused unless it holds an LTR graph."""
    mv = registry.resolve(name, version)
    if not (mv.path / LTR_MODEL_FILE).is_file():
        raise RegistryError(f"{name}/{mv.version} under {registry.root} is not an LTR version")
    return mv


def publish(registry: Registry, name: str, build: Path, version: str | None = None) -> ModelVersion:
    """Rename a fully written build directory (from ``registry.staging_dir``) into place."""
    if not (Path(build) / LTR_MODEL_FILE).is_file():
        raise RegistryError(f"{build} holds no {LTR_MODEL_FILE}")
    return registry.publish(name, build, version)


def promote(registry: Registry, name: str, version: str) -> ModelVersion:
    """Point ``current`` at the LTR ``version`` atomically."""
    resolve(registry, name, version)
    return registry.promote(name, version)
