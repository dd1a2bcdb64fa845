"""Datasets of served rows (``format: served``): the model inputs as the service assembled them.

``mtrank logs export`` (training/logs.py) writes the rows a model was served with: sparse
vocabulary indices and normalised dense values, exactly the arrays the ONNX graph received, with
the labels that followed. Training on them must not encode them again: the vocabularies and the
normalisation are the served model's, fixed in its ``spec.json``. A dataset spec says so with
``format: served`` and ``feature_spec: PATH``; training/data.py then takes the FeatureSpec from
that file (its outputs from the dataset's tasks) instead of counting vocabularies (pass 1), and
copies the ``sparse.NAME`` / ``dense.NAME`` columns as they are instead of encoding raw values
(pass 2). A model trained so takes the served model's inputs, so it is served from the same
feature snapshot.

Checks, because a wrong spec file would train on indices that mean other values:

- the dataset's ``sparse`` and ``dense`` columns are the spec's inputs, in order, with their
  sources (and no ``min_count``, ``log1p`` or ``default``: the spec fixed those);
- every split file carries, in its Parquet schema metadata (``mtrank.served``), the
  ``spec_sha256`` of the inputs it was encoded with, and it is this spec's;
- every sparse index lies inside its vocabulary and every dense value is finite.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtrank.spec import FeatureSpec, TaskOutput
from training.config import ConfigError, DatasetSpec

SPARSE_PREFIX: Final = "sparse."  # column of a sparse input: vocabulary indices, int64
DENSE_PREFIX: Final = "dense."  # column of a dense input: normalised values, float32
META_KEY: Final = b"mtrank.served"  # Parquet schema metadata: the served log's segment meta


def input_sha256(spec: FeatureSpec) -> str:
    """Checksum of what a model reads (its spec without outputs), as the served log records it
    in ``spec_sha256`` (service/served_log.py ``spec_meta``)."""
    return spec.model_copy(update={"outputs": []}).sha256()


def input_columns(ds: DatasetSpec) -> list[str]:
    """The Parquet columns holding the model inputs, in input order."""
    return [SPARSE_PREFIX + c.name for c in ds.sparse] + [DENSE_PREFIX + c.name for c in ds.dense]


def _check_columns(ds: DatasetSpec, spec: FeatureSpec, where: Path) -> None:
    declared = [(c.name, c.source) for c in ds.sparse], [(c.name, c.source) for c in ds.dense]
    served = [(f.name, f.source) for f in spec.sparse], [(f.name, f.source) for f in spec.dense]
    for kind, mine, theirs in zip(("sparse", "dense"), declared, served, strict=True):
        if mine != theirs:
            raise ConfigError(
                f"dataset {ds.name!r}: {kind} columns {mine} are not the inputs of {where} "
                f"{theirs} (names, sources and order must match: the rows are encoded for them)"
            )
    for c in ds.sparse:
        if c.min_count != 1:
            raise ConfigError(
                f"dataset {ds.name!r}: sparse column {c.name!r}: min_count has no effect on "
                "served rows (the vocabulary is the served spec's)"
            )
    for d in ds.dense:
        if d.log1p or d.default is not None:
            raise ConfigError(
                f"dataset {ds.name!r}: dense column {d.name!r}: log1p and default have no "
                "effect on served rows (the served spec normalised them)"
            )


def served_feature_spec(ds: DatasetSpec, splits: Mapping[str, Path]) -> FeatureSpec:
    """The FeatureSpec of a served dataset: the served inputs, the dataset's tasks as outputs.

    Raises ConfigError when the spec file, the dataset's columns and the split files disagree.
    """
    if ds.feature_spec is None:
        raise ConfigError(f"dataset {ds.name!r}: format served needs feature_spec")
    path = Path(ds.feature_spec)
    try:
        spec = FeatureSpec.load(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"dataset {ds.name!r}: cannot read feature_spec {path}: {e}") from e
    _check_columns(ds, spec, path)
    sha = input_sha256(spec)
    for split, file in splits.items():
        try:
            metadata = pq.read_schema(file).metadata or {}
        except (OSError, pa.ArrowInvalid) as e:
            raise ConfigError(f"{file}: {split} split is not a Parquet file: {e}") from e
        if META_KEY not in metadata:
            raise ConfigError(f"{file}: {split} split has no {META_KEY.decode()} metadata: "
                              "not written by mtrank logs export")  # fmt: skip
        theirs = json.loads(metadata[META_KEY]).get("spec_sha256")
        if theirs != sha:
            raise ConfigError(
                f"{file}: {split} split was encoded with inputs {str(theirs)[:12]}, feature_spec "
                f"{path} has inputs {sha[:12]}: point feature_spec at the served model's spec"
            )
    outputs = [TaskOutput(name=t.name, kind=t.kind) for t in ds.tasks]
    return spec.model_copy(update={"outputs": outputs})


def served_inputs(
    batch: pa.RecordBatch, spec: FeatureSpec, path: Path
) -> tuple[np.ndarray, np.ndarray]:
    """(sparse (n, S) int64, dense (n, D) float32) of a batch of served rows, as stored."""
    n = batch.num_rows
    sparse = np.empty((n, len(spec.sparse)), dtype=np.int64)
    for j, f in enumerate(spec.sparse):
        col = batch.column(SPARSE_PREFIX + f.name)
        if col.null_count:
            raise ConfigError(f"{path}: column {SPARSE_PREFIX + f.name!r} has missing values")
        x = np.asarray(pc.cast(col, pa.int64()).to_numpy(zero_copy_only=False))  # (n,)
        bad = (x < 0) | (x >= f.vocab_size)
        if bad.any():
            raise ConfigError(
                f"{path}: column {SPARSE_PREFIX + f.name!r} holds index {int(x[bad][0])} outside "
                f"the vocabulary of {f.vocab_size}: the rows were not encoded with this spec"
            )
        sparse[:, j] = x
    dense = np.empty((n, len(spec.dense)), dtype=np.float32)
    for j, d in enumerate(spec.dense):
        col = batch.column(DENSE_PREFIX + d.name)
        x = np.asarray(pc.cast(col, pa.float32()).to_numpy(zero_copy_only=False))  # (n,)
        if not np.isfinite(x).all():
            raise ConfigError(f"{path}: column {DENSE_PREFIX + d.name!r} has missing or "
                              "non-finite values")  # fmt: skip
        dense[:, j] = x
    return sparse, dense
