"""The feature contract between training and serving (``spec.json``).

Training writes one :class:`FeatureSpec` beside each exported ``model.onnx``; the service reads it
and never declares features again. It fixes, for every model input column, its order, where the
value comes from (user snapshot, item snapshot, or the request), how a raw value becomes a number
(vocabulary lookup with an out-of-vocabulary index, or dense normalisation) and the default used
when a value is missing (the cold-start path).

Index 0 of every vocabulary is the out-of-vocabulary bucket: unseen ids, ids rarer than the
vocabulary's min count, and missing values all map there.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

SPEC_FILE = "spec.json"
OOV_INDEX = 0
Source = Literal["user", "item", "context"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SparseField(_Frozen):
    """A categorical field: raw string ids mapped through a vocabulary to embedding rows."""

    name: str
    source: Source
    vocab: list[str] = Field(description="raw values; value vocab[i] has index i + 1 (0 is OOV)")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + 1

    @cached_property
    def index(self) -> dict[str, int]:
        return {v: i + 1 for i, v in enumerate(self.vocab)}

    def encode(self, raw: object) -> int:
        """Index of one raw value; ``None`` and unseen values go to the OOV bucket.

        The key of a raw value is ``str(raw)``: this is the one encoding rule that training,
        snapshot building and serving share (:meth:`encode_many` applies it to columns).
        """
        if raw is None:
            return OOV_INDEX
        return self.index.get(str(raw), OOV_INDEX)

    def encode_many(self, values: Iterable[object]) -> np.ndarray:
        """(n,) int64 indices of raw values; each distinct value is looked up once (encode)."""
        # Keyed by the text encode() looks up: 7 and 7.0 are equal dict keys but "7" != "7.0".
        seen: dict[str | None, int] = {}
        slots = [seen.setdefault(None if v is None else str(v), len(seen)) for v in values]
        codes = [self.encode(v) for v in seen]
        table = np.asarray(codes, dtype=np.int64)
        return table[np.asarray(slots, dtype=np.intp)] if slots else np.empty(0, np.int64)


class DenseField(_Frozen):
    """A numeric field, fed to the model as ``(f(x) - mean) / std`` with f = log1p or identity."""

    name: str
    source: Source
    mean: float
    std: float = Field(gt=0.0)
    default: float = Field(description="raw value used when the feature is missing")
    log1p: bool = False

    def normalise(self, raw: np.ndarray | float) -> np.ndarray:
        x = np.asarray(raw, dtype=np.float64)
        x = np.where(np.isfinite(x), x, self.default)
        if self.log1p:
            x = np.log1p(np.maximum(x, 0.0))
        return ((x - self.mean) / self.std).astype(np.float32)


class TaskOutput(_Frozen):
    """One named model output: a calibrated probability (binary) or a value (regression)."""

    name: str
    kind: Literal["binary", "regression"]


class FeatureSpec(_Frozen):
    """The whole contract. ``sparse`` and ``dense`` are in model input column order."""

    format_version: Literal[1] = 1
    sparse: list[SparseField]
    dense: list[DenseField]
    outputs: list[TaskOutput]
    sparse_input: str = "sparse_ids"
    dense_input: str = "dense_values"

    @model_validator(mode="after")
    def _unique_names(self) -> FeatureSpec:
        names = [f.name for f in self.sparse] + [f.name for f in self.dense]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"feature names must be unique, repeated: {dupes}")
        outs = [o.name for o in self.outputs]
        if len(set(outs)) != len(outs):
            raise ValueError(f"output names must be unique: {outs}")
        return self

    # -- column positions by source (what the service gathers from where) --
    def sparse_positions(self, source: Source) -> list[int]:
        return [i for i, f in enumerate(self.sparse) if f.source == source]

    def dense_positions(self, source: Source) -> list[int]:
        return [i for i, f in enumerate(self.dense) if f.source == source]

    def fields(self, source: Source) -> tuple[list[SparseField], list[DenseField]]:
        return (
            [f for f in self.sparse if f.source == source],
            [f for f in self.dense if f.source == source],
        )

    @property
    def task_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    # -- encoding of one entity's raw attributes (snapshot building, request context) --
    def encode_entity(
        self, source: Source, raw: Mapping[str, object]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode raw values of one entity into (sparse indices int64, normalised dense float32)."""
        sparse_fields, dense_fields = self.fields(source)
        sparse = np.array([f.encode(raw.get(f.name)) for f in sparse_fields], dtype=np.int64)
        dense = np.array(
            [_float_or(raw.get(f.name), f.default) for f in dense_fields], dtype=np.float64
        )
        normed = np.array(
            [f.normalise(v) for f, v in zip(dense_fields, dense, strict=True)], dtype=np.float32
        )
        return sparse, normed.reshape(len(dense_fields))

    def default_entity(self, source: Source) -> tuple[np.ndarray, np.ndarray]:
        """The encoding of an entity with every value missing: the cold-start defaults."""
        return self.encode_entity(source, {})

    # -- serialisation --
    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=1, sort_keys=True)

    def sha256(self) -> str:
        """Checksum of the canonical JSON: snapshots record it to prove they match the model."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def save(self, directory: Path) -> Path:
        path = Path(directory) / SPEC_FILE
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: Path) -> FeatureSpec:
        path = Path(path)
        if path.is_dir():
            path = path / SPEC_FILE
        return cls.model_validate_json(path.read_text())


def _float_or(raw: object, default: float) -> float:
    if raw is None or isinstance(raw, bool):
        return default if raw is None else float(raw)
    try:
        x = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default
    return x if math.isfinite(x) else default


def build_vocab(values: Iterable[object], min_count: int = 1) -> list[str]:
    """Vocabulary of the values seen at least ``min_count`` times, most frequent first.

    Ties break by the value itself so the same data always yields the same indices.
    """
    counts: dict[str, int] = {}
    for v in values:
        if v is None:
            continue
        key = str(v)
        counts[key] = counts.get(key, 0) + 1
    kept = [(c, k) for k, c in counts.items() if c >= min_count]
    kept.sort(key=lambda ck: (-ck[0], ck[1]))
    return [k for _, k in kept]
