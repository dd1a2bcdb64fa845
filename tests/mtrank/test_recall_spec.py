"""The recall contract: padding and truncation, OOV, input order, validation, round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from mtrank.recall_spec import (
    PAD_INDEX,
    HistoryField,
    RecallInputs,
    RecallSpec,
    TextField,
    pad_sequences,
)
from mtrank.spec import OOV_INDEX, SparseField


def make_spec(**changes: object) -> RecallSpec:
    items = SparseField(name="item_id", source="item", vocab=["100", "101", "102"])
    data: dict[str, object] = {
        "model_type": "dssm",
        "user_sparse": [
            SparseField(name="gender", source="user", vocab=["F", "M"]),
            SparseField(name="city_tier", source="user", vocab=["1", "2"]),
        ],
        "history": HistoryField(items=items, max_len=3),
        "item_sparse": [items],
        "item_dense": [],
        "title": TextField(
            tokens=SparseField(name="t", source="item", vocab=["red", "bag"]), max_len=2
        ),
        "embedding_dim": 8,
        "similarity": "cosine",
    }
    return RecallSpec(**(data | changes))  # type: ignore[arg-type]


def test_pad_keeps_first_or_last_and_pads_with_zero() -> None:
    seqs = [np.array([1, 2, 3, 4]), np.array([5]), np.array([], np.int64)]
    ids, lengths = pad_sequences(seqs, 3, keep="last")
    assert ids.tolist() == [[2, 3, 4], [5, 0, 0], [0, 0, 0]]
    assert lengths.tolist() == [3, 1, 0]
    ids, _ = pad_sequences(seqs, 3, keep="first")
    assert ids[0].tolist() == [1, 2, 3]
    assert PAD_INDEX == OOV_INDEX == 0
    with pytest.raises(ValueError):
        pad_sequences(seqs, 0, keep="last")


def test_history_keeps_the_most_recent_and_maps_unknown_to_oov() -> None:
    spec = make_spec()
    ids, lengths = spec.history.encode([[100, 999, 101, 102], [102], []])
    # oldest first; the oldest click (100) fell out of the window; 999 is OOV inside the length
    assert ids.tolist() == [[0, 2, 3], [3, 0, 0], [0, 0, 0]]
    assert lengths.tolist() == [3, 1, 0]


def test_title_tokenises_lower_case_and_keeps_the_first_tokens() -> None:
    ids, lengths = make_spec().title.encode(["Red BAG red", "blue", None])  # type: ignore[union-attr]
    assert ids.tolist() == [[1, 2], [0, 0], [0, 0]]
    assert lengths.tolist() == [2, 1, 0]


def test_encode_users_builds_the_onnx_feed_in_order() -> None:
    spec = make_spec()
    feed = spec.encode_users([{"gender": "M", "city_tier": 2}, {}], [[101], []])
    assert list(feed) == ["user_sparse", "history_ids", "history_length"] == spec.inputs.order
    assert feed["user_sparse"].tolist() == [[2, 2], [0, 0]]  # a missing attribute is OOV
    assert feed["history_ids"].dtype == np.int64 and feed["history_ids"].shape == (2, 3)
    assert feed["history_length"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="2 users but 1 histories"):
        spec.encode_users([{}, {}], [[]])


def test_validation_rejects_bad_contracts() -> None:
    with pytest.raises(ValidationError, match="source 'user'"):
        make_spec(user_sparse=[SparseField(name="x", source="item", vocab=[])])
    with pytest.raises(ValidationError, match="repeat"):
        f = SparseField(name="x", source="user", vocab=[])
        make_spec(user_sparse=[f, f])
    with pytest.raises(ValidationError, match="must differ"):
        make_spec(inputs=RecallInputs(history="user_sparse"))
    with pytest.raises(ValidationError):
        make_spec(similarity="l2")
    with pytest.raises(ValidationError):
        make_spec(unknown_key=1)


def test_round_trip_and_checksum(tmp_path: Path) -> None:
    spec = make_spec()
    path = spec.save(tmp_path)
    assert path.name == "recall_spec.json"
    back = RecallSpec.load(tmp_path)
    assert back == spec and back.sha256() == spec.sha256()
    assert make_spec(embedding_dim=16).sha256() != spec.sha256()
