"""The item attribute table is the one place attributes are declared; everything else derives.

The derived views are checked against a table with one extra line, so a consumer that still keeps
its own list (and would silently miss the new attribute) fails here.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mtrank import snapshot
from mtrank.attributes import ITEM_ATTRIBUTES, Attribute, AttributeTable
from mtrank.spec import FeatureSpec, SparseField

EXTRA = Attribute("margin", "<f4", 0.0, formula=True, override=True, logged=True, minimum=0.0)


def with_extra() -> AttributeTable:
    return AttributeTable((*ITEM_ATTRIBUTES.attributes, EXTRA))


def test_the_layout_of_the_current_snapshot_format_is_pinned() -> None:
    # Changing ITEM_ATTRIBUTES changes the record layout: bump SNAPSHOT_FORMAT and pin the new
    # fingerprint in FORMAT_LAYOUTS, so old snapshots are refused instead of misread.
    assert ITEM_ATTRIBUTES.fingerprint() == snapshot.FORMAT_LAYOUTS[snapshot.SNAPSHOT_FORMAT]


def test_one_more_line_changes_the_fingerprint() -> None:
    assert with_extra().fingerprint() != ITEM_ATTRIBUTES.fingerprint()
    renamed = AttributeTable(
        tuple(dataclasses.replace(a, dtype="<f8") if a.name == "price" else a
              for a in ITEM_ATTRIBUTES)
    )  # fmt: skip
    assert renamed.fingerprint() != ITEM_ATTRIBUTES.fingerprint()


def test_every_view_derives_from_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    table = with_extra()
    assert "margin" in table.formula_names
    assert "margin" in table.overridable
    assert "margin" in table.rule_fields
    assert "margin" not in table.integer_rule_fields
    assert table.defaults()["margin"] == 0.0
    # The snapshot record and its cold-start default follow the table the module sees.
    monkeypatch.setattr(snapshot, "ITEM_ATTRIBUTES", table)
    spec = FeatureSpec(
        sparse=[SparseField(name="item_id", source="item", vocab=["a"])], dense=[], outputs=[]
    )
    dtype = snapshot.item_dtype(spec)
    assert dtype.names is not None and dtype.names[-1] == "margin"
    assert dtype["margin"] == np.dtype("<f4")
    assert snapshot.default_item_record(spec)["margin"] == 0.0


def test_current_views() -> None:
    assert ITEM_ATTRIBUTES.formula_names == ("price", "promoted", "quality")
    assert ITEM_ATTRIBUTES.overridable == ("price", "promoted", "quality")
    assert ITEM_ATTRIBUTES.codes == ("category", "brand")
    assert set(ITEM_ATTRIBUTES.integer_rule_fields) == {
        "category", "brand", "promoted", "first_seen_day", "exposure_cap",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"dtype": "<i4", "kind": "code", "override": True}, "neither overridable"),
        ({"dtype": "<f4", "kind": "day"}, "integer dtype"),
    ],
)
def test_inconsistent_rows_are_refused(kwargs: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Attribute("x", default=-1, **kwargs)  # type: ignore[arg-type]


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        AttributeTable((*ITEM_ATTRIBUTES.attributes, ITEM_ATTRIBUTES["price"]))


def test_one_encoder_for_columns_and_values() -> None:
    field = SparseField(name="brand", source="item", vocab=["7", "x", "None"])
    values = [7, "7", None, "x", 7.0, "None", "unseen", None]
    got = field.encode_many(values)
    assert got.dtype == np.int64
    assert got.tolist() == [field.encode(v) for v in values]
    # None is missing (OOV) even where the literal string "None" is a vocabulary entry
    assert got[2] == 0 and got[5] == 3
    assert field.encode_many([]).shape == (0,)
