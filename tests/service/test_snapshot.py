"""Pins the snapshot contract (mtrank/snapshot.py) byte for byte: record layouts and Redis keys.

A change to any of these bytes breaks every snapshot already loaded in Redis; these tests make
such a change deliberate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mtrank.snapshot import (
    Snapshot,
    decode,
    default_item_record,
    default_user_record,
    exposure_key,
    item_dtype,
    item_key,
    meta_key,
    pointer_key,
    user_dtype,
    user_key,
)
from mtrank.spec import DenseField, FeatureSpec, SparseField, TaskOutput

SPEC = FeatureSpec(
    sparse=[
        SparseField(name="cat", source="item", vocab=["x"]),
        SparseField(name="seg", source="user", vocab=["a", "b"]),
    ],
    dense=[
        DenseField(name="age", source="user", mean=35.0, std=10.0, default=30.0),
        DenseField(name="price", source="item", mean=0.0, std=1.0, default=0.0),
    ],
    outputs=[TaskOutput(name="ctr", kind="binary")],
)
# sparse <i8 = 2 | dense <f4 = 1.5
USER_BYTES = bytes.fromhex("02000000000000000000c03f")
# sparse <i8 = 1 | dense <f4 = 0.5 | category <i4 = 3 | brand <i4 = -1 | price <f4 = 2.5
# | promoted u1 = 1 | first_seen_day <i4 = 20000 | quality <f4 = 1.0 | exposure_cap <i4 = -1
ITEM_BYTES = bytes.fromhex(
    "01000000000000000000003f03000000ffffffff0000204001204e00000000803fffffffff"
)


def user_record() -> np.ndarray:
    rec = np.zeros((), dtype=user_dtype(SPEC))
    rec["sparse"], rec["dense"] = [2], [1.5]
    return rec


def item_record() -> np.ndarray:
    rec = np.zeros((), dtype=item_dtype(SPEC))
    rec["sparse"], rec["dense"] = [1], [0.5]
    rec["category"], rec["brand"], rec["price"], rec["promoted"] = 3, -1, 2.5, 1
    rec["first_seen_day"], rec["quality"], rec["exposure_cap"] = 20000, 1.0, -1
    return rec


def test_user_record_encodes_to_exact_bytes() -> None:
    assert user_dtype(SPEC).itemsize == 12
    assert user_record().tobytes() == USER_BYTES


def test_item_record_encodes_to_exact_bytes() -> None:
    assert item_dtype(SPEC).itemsize == 37  # packed: no padding before the u1 or after it
    assert item_record().tobytes() == ITEM_BYTES


def test_default_records_are_the_spec_defaults() -> None:
    # OOV index 0; age default 30 -> (30 - 35) / 10 = -0.5
    assert default_user_record(SPEC).tobytes() == bytes.fromhex("0000000000000000000000bf")
    item = default_item_record(SPEC)
    assert item.tobytes() == bytes.fromhex(
        "000000000000000000000000ffffffffffffffff0000000000ffffffff0000803fffffffff"
    )


def test_decode_hits_misses_and_wrong_lengths() -> None:
    default = default_item_record(SPEC)
    values: list[bytes | None] = [ITEM_BYTES, None, ITEM_BYTES[:-1], ITEM_BYTES + b"\0", ITEM_BYTES]
    recs, found = decode(values, default)
    assert found.tolist() == [True, False, False, False, True]
    assert recs.shape == (5,)
    assert recs[0].tobytes() == ITEM_BYTES and recs[4].tobytes() == ITEM_BYTES
    for k in (1, 2, 3):  # misses and wrong lengths read as the default, never as garbage
        assert recs[k].tobytes() == default.tobytes()
    assert recs["price"].tolist() == [2.5, 0.0, 0.0, 0.0, 2.5]
    assert recs["sparse"][:, 0].tolist() == [1, 0, 0, 0, 1]


def test_decode_of_nothing() -> None:
    recs, found = decode([], default_user_record(SPEC))
    assert recs.shape == (0,) and found.shape == (0,)


def test_keys_are_exact_bytes() -> None:
    assert pointer_key("prod") == b"mtrank:prod:snap"
    assert meta_key("prod", "20261123-a") == b"mtrank:prod:snap:20261123-a:meta"
    assert user_key("prod", "v1", "u42") == b"mtrank:prod:snap:v1:u:u42"
    assert item_key("prod", "v1", "sku-9") == b"mtrank:prod:snap:v1:i:sku-9"
    assert exposure_key("prod", "20261123", "sku-9") == b"mtrank:prod:{exp:20261123}:sku-9"
    assert item_key("ns", "v1", "é") == b"mtrank:ns:snap:v1:i:\xc3\xa9"  # ids are UTF-8


def test_snapshot_roundtrip_and_spec_check(tmp_path: Path) -> None:
    users = np.stack([user_record(), default_user_record(SPEC)])
    items = np.stack([item_record()])
    snap = Snapshot(SPEC.sha256(), "v1", np.array(["u1", "u2"]), users, np.array(["i1"]), items)
    path = snap.save(tmp_path / "snapshot.npz")
    back = Snapshot.load(path, SPEC)
    assert back.version == "v1"
    assert back.users.tobytes() == USER_BYTES + default_user_record(SPEC).tobytes()
    assert back.items.tobytes() == ITEM_BYTES
    assert back.user_ids.tolist() == ["u1", "u2"]
    other = SPEC.model_copy(update={"outputs": [TaskOutput(name="cvr", kind="binary")]})
    with pytest.raises(ValueError, match="rebuild it"):
        Snapshot.load(path, other)
