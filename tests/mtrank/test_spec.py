"""The feature contract: encoding, defaults, validation, checksums."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from mtrank.spec import OOV_INDEX, DenseField, FeatureSpec, SparseField, TaskOutput, build_vocab


def make_spec() -> FeatureSpec:
    return FeatureSpec(
        sparse=[
            SparseField(name="user_id", source="user", vocab=["u1", "u2"]),
            SparseField(name="item_id", source="item", vocab=["i1", "i2", "i3"]),
            SparseField(name="device", source="context", vocab=["ios", "android"]),
        ],
        dense=[
            DenseField(name="price", source="item", mean=2.0, std=0.5, default=10.0, log1p=True),
            DenseField(name="activity", source="user", mean=1.0, std=2.0, default=0.0),
        ],
        outputs=[TaskOutput(name="ctr", kind="binary"), TaskOutput(name="stay", kind="regression")],
    )


def test_sparse_encoding_maps_unseen_and_missing_to_oov() -> None:
    f = SparseField(name="item_id", source="item", vocab=["a", "b"])
    assert [f.encode("a"), f.encode("b"), f.encode("zzz"), f.encode(None)] == [1, 2, 0, 0]
    assert f.vocab_size == 3
    assert OOV_INDEX == 0


def test_sparse_encoding_stringifies_numbers() -> None:
    f = SparseField(name="c", source="item", vocab=["7", "8"])
    assert f.encode(7) == 1
    assert f.encode("8") == 2


def test_dense_normalise_log1p_and_non_finite_default() -> None:
    f = DenseField(name="price", source="item", mean=2.0, std=0.5, default=10.0, log1p=True)
    got = f.normalise(np.array([0.0, 9.0, np.nan, np.inf]))
    expected = (np.log1p(np.array([0.0, 9.0, 10.0, 10.0])) - 2.0) / 0.5
    np.testing.assert_allclose(got, expected.astype(np.float32), rtol=1e-6)
    assert got.dtype == np.float32


def test_encode_entity_by_source_and_defaults() -> None:
    spec = make_spec()
    sparse, dense = spec.encode_entity("item", {"item_id": "i3", "price": 9.0})
    assert sparse.tolist() == [3]
    np.testing.assert_allclose(dense, [(np.log1p(9.0) - 2.0) / 0.5], rtol=1e-6)
    sparse, dense = spec.default_entity("item")
    assert sparse.tolist() == [0]
    np.testing.assert_allclose(dense, [(np.log1p(10.0) - 2.0) / 0.5], rtol=1e-6)
    # a garbage value for a dense feature falls back to its default, never NaN
    _, dense = spec.encode_entity("user", {"activity": "not a number"})
    np.testing.assert_allclose(dense, [(0.0 - 1.0) / 2.0])


def test_positions_follow_input_order() -> None:
    spec = make_spec()
    assert spec.sparse_positions("user") == [0]
    assert spec.sparse_positions("item") == [1]
    assert spec.sparse_positions("context") == [2]
    assert spec.dense_positions("item") == [0]
    assert spec.dense_positions("user") == [1]
    assert spec.task_names == ["ctr", "stay"]


def test_duplicate_names_and_unknown_keys_are_rejected() -> None:
    with pytest.raises(ValidationError, match="repeated"):
        FeatureSpec(
            sparse=[SparseField(name="x", source="item", vocab=[])],
            dense=[DenseField(name="x", source="item", mean=0, std=1, default=0)],
            outputs=[],
        )
    with pytest.raises(ValidationError, match="extra"):
        FeatureSpec.model_validate({"sparse": [], "dense": [], "outputs": [], "colour": 1})
    with pytest.raises(ValidationError):
        DenseField(name="x", source="item", mean=0, std=0.0, default=0)


def test_round_trip_and_checksum(tmp_path: Path) -> None:
    spec = make_spec()
    spec.save(tmp_path)
    loaded = FeatureSpec.load(tmp_path)
    assert loaded == spec
    assert loaded.sha256() == spec.sha256()
    changed = spec.model_copy(update={"outputs": [TaskOutput(name="ctr", kind="binary")]})
    assert changed.sha256() != spec.sha256()


def test_build_vocab_min_count_and_deterministic_ties() -> None:
    values = ["b", "a", "c", "a", "b", None, "d"]
    assert build_vocab(values) == ["a", "b", "c", "d"]
    assert build_vocab(values, min_count=2) == ["a", "b"]
