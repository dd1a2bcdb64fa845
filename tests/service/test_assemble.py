"""Assembler: spec column order, broadcasting, context encoding, defaults and overrides."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtrank.snapshot import default_item_record, default_user_record, item_dtype, user_dtype
from service.features.assemble import Assembler, OverrideError
from tests.support.onnx_model import make_spec

# sparse: item_id(item) user_id(user) device(context) category(item) segment(user)
# dense:  price(item, log1p, mean 3, std 1.5) hour(context, mean 12, std 7) age(user)
#         quality_score(item)
SPEC = make_spec()
ASM = Assembler(SPEC)


def user() -> np.ndarray:
    rec = np.zeros((), dtype=user_dtype(SPEC))
    rec["sparse"], rec["dense"] = [3, 1], [0.25]  # user_id, segment | age
    return rec


def items() -> np.ndarray:
    recs = np.zeros(3, dtype=item_dtype(SPEC))
    recs["sparse"] = [[5, 2], [6, 0], [7, 3]]  # item_id, category
    recs["dense"] = [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]  # price, quality_score
    recs["price"] = [9.0, 19.0, 29.0]
    recs["exposure_cap"] = [1, 2, 3]
    recs["promoted"] = [0, 1, 0]
    return recs


def test_columns_follow_the_spec_order_with_user_and_context_broadcast() -> None:
    sparse, dense = ASM.assemble(user(), items(), {"device": "android", "hour": 19})
    assert sparse.dtype == np.int64 and dense.dtype == np.float32
    assert sparse.tolist() == [[5, 3, 2, 2, 1], [6, 3, 2, 0, 1], [7, 3, 2, 3, 1]]
    np.testing.assert_allclose(
        dense,
        [[0.1, 1.0, 0.25, 0.2], [0.3, 1.0, 0.25, 0.4], [0.5, 1.0, 0.25, 0.6]],
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    ("context", "device", "hour"),
    [
        (None, 0, 0.0),  # no context: OOV device, default hour 12 -> 0
        ({}, 0, 0.0),
        ({"device": "web"}, 3, 0.0),  # missing hour -> its default
        ({"device": "tv", "hour": 5}, 0, -1.0),  # unseen device -> OOV
        ({"hour": "not a number"}, 0, 0.0),  # unparsable -> default
        ({"hour": float("nan")}, 0, 0.0),
    ],
)
def test_context_encoding_and_defaults(
    context: dict[str, object] | None, device: int, hour: float
) -> None:
    sparse, dense = ASM.assemble(user(), items(), context)
    assert sparse[:, 2].tolist() == [device] * 3
    np.testing.assert_allclose(dense[:, 1], [hour] * 3, atol=1e-6)


def test_cold_start_records_give_the_spec_defaults() -> None:
    recs = np.repeat(default_item_record(SPEC).reshape(1), 2)
    sparse, dense = ASM.assemble(default_user_record(SPEC), recs, None)
    assert sparse.tolist() == [[0, 0, 0, 0, 0]] * 2
    expected = [
        (np.log1p(20.0) - 3.0) / 1.5,  # price default 20, log1p
        0.0,  # hour default 12
        (30.0 - 35.0) / 10.0,  # age default 30
        0.0,  # quality_score default 0.5
    ]
    np.testing.assert_allclose(dense, [expected] * 2, rtol=1e-6)


def test_no_items() -> None:
    sparse, dense = ASM.assemble(user(), items()[:0], None)
    assert sparse.shape == (0, 5) and dense.shape == (0, 4)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 50), seed=st.integers(0, 2**32 - 1))
def test_every_column_comes_from_its_source(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    u = np.zeros((), dtype=user_dtype(SPEC))
    u["sparse"] = rng.integers(0, 9, 2)
    u["dense"] = rng.normal(size=1)
    recs = np.zeros(n, dtype=item_dtype(SPEC))
    recs["sparse"] = rng.integers(0, 9, (n, 2))
    recs["dense"] = rng.normal(size=(n, 2))
    sparse, dense = ASM.assemble(u, recs, {"device": "ios", "hour": 12.0})
    assert sparse.shape == (n, 5) and dense.shape == (n, 4)
    np.testing.assert_array_equal(sparse[:, [0, 3]], recs["sparse"])
    np.testing.assert_array_equal(sparse[:, [1, 4]], np.broadcast_to(u["sparse"], (n, 2)))
    np.testing.assert_array_equal(sparse[:, 2], np.ones(n))
    np.testing.assert_array_equal(dense[:, [0, 3]], recs["dense"])
    np.testing.assert_array_equal(dense[:, 2], np.full(n, u["dense"][0], dtype=np.float32))


def test_price_override_changes_model_input_and_raw_attribute() -> None:
    recs = items()
    out = ASM.override_items(recs, {"price": np.array([10.0, np.nan, 0.0])})
    # model input: log1p then (x - 3) / 1.5; NaN keeps the stored value
    np.testing.assert_allclose(
        out["dense"][:, 0], [(np.log1p(10.0) - 3) / 1.5, 0.3, -2.0], rtol=1e-6
    )
    np.testing.assert_allclose(out["price"], [10.0, 19.0, 0.0])
    np.testing.assert_array_equal(out["dense"][:, 1], recs["dense"][:, 1])  # other columns kept
    assert recs["price"].tolist() == [9.0, 19.0, 29.0]  # input untouched
    sparse, dense = ASM.assemble(user(), out, None)
    np.testing.assert_allclose(dense[:, 0], out["dense"][:, 0])


def test_override_of_attribute_only_and_feature_only_values() -> None:
    recs = items()
    out = ASM.override_items(recs, {"quality": 0.5, "promoted": [1, np.nan, 0.7]})
    np.testing.assert_array_equal(out["dense"], recs["dense"])  # not model features
    assert out["quality"].tolist() == [0.5, 0.5, 0.5]
    # integer attributes round; NaN keeps the stored value
    assert out["promoted"].tolist() == [1, 1, 1] and out["promoted"].dtype == np.uint8

    out = ASM.override_items(recs, {"quality_score": [0.7, np.nan, 0.5]})
    np.testing.assert_allclose(out["dense"][:, 1], [1.0, 0.4, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(out["quality"], recs["quality"])


def test_only_attributes_the_table_marks_overridable_can_be_overridden() -> None:
    with pytest.raises(OverrideError, match="cannot override 'exposure_cap'"):
        ASM.override_items(items(), {"exposure_cap": [5, 6, 7]})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"colour": 1.0}, "cannot override 'colour'"),
        ({"category": 1.0}, "cannot override 'category'"),  # sparse features are not overridable
        ({"price": [1.0, 2.0]}, "has \\(2,\\) values for 3 items"),
        ({"price": "cheap"}, "not numeric"),
    ],
)
def test_bad_overrides_name_the_problem(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(OverrideError, match=message):
        ASM.override_items(items(), overrides)  # type: ignore[arg-type]
    assert "price" in ASM.overridable and "quality_score" in ASM.overridable
