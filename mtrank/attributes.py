"""The item attribute table: every raw item value beyond the model's features, declared once.

Besides the encoded model inputs, a snapshot's item record carries raw attributes that fusion and
the re-rank rules read: a price to multiply by, a category to diversify over, a daily exposure
cap. Each is one :class:`Attribute` row in :data:`ITEM_ATTRIBUTES`, and everything else is derived
from the table:

* the snapshot record layout (:func:`mtrank.snapshot.item_dtype`) and the cold-start record;
* the names a fusion formula may use (``formula=True``);
* the candidate fields a ``/rank`` request may override (``override=True``);
* the fields a rule condition may test (``rule=True``) and diversity may group by (integers);
* the columns the synthetic generator writes into ``items.parquet`` and into impression rows
  (``logged=True``).

Adding an attribute is one line here plus a bump of :data:`mtrank.snapshot.SNAPSHOT_FORMAT`: the
record layout changes, so snapshots written before cannot be read as the new layout (a test pins
the layout fingerprint of each format version).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Kind = Literal["number", "flag", "code", "day"]


@dataclass(frozen=True)
class Attribute:
    """One raw item attribute.

    Args:
        name: the column name in the items table, the snapshot record and the API.
        dtype: numpy dtype string of the snapshot record column (little-endian, packed).
        default: the value of an item nothing is known about (cold start, or a missing cell).
        kind: ``number`` (a measured value), ``flag`` (0/1), ``code`` (a category-like string,
            stored as an index into the snapshot's attribute table; -1 is unknown) or ``day``
            (days since 1970-01-01).
        formula: a fusion formula may read it.
        override: a request may override it per candidate (``code`` attributes never: a caller
            cannot know the snapshot's code table).
        rule: a rule condition may test it.
        logged: impression logs carry it, so a model may also use it as a feature.
        minimum: the smallest value a request override may carry.
    """

    name: str
    dtype: str
    default: float
    kind: Kind = "number"
    formula: bool = False
    override: bool = False
    rule: bool = True
    logged: bool = False
    minimum: float | None = None

    def __post_init__(self) -> None:
        if self.kind == "code" and (self.override or self.formula):
            raise ValueError(f"{self.name}: a code attribute is neither overridable nor numeric")
        if self.kind in ("code", "day") and np.dtype(self.dtype).kind not in "iu":
            raise ValueError(f"{self.name}: a {self.kind} attribute needs an integer dtype")

    @property
    def is_integer(self) -> bool:
        return np.dtype(self.dtype).kind in "iu"


class AttributeTable:
    """An ordered set of attributes with the views each consumer needs."""

    def __init__(self, attributes: tuple[Attribute, ...]) -> None:
        names = [a.name for a in attributes]
        if len(set(names)) != len(names):
            raise ValueError(f"attribute names must be unique: {names}")
        self.attributes = attributes
        self._by_name = {a.name: a for a in attributes}

    def __iter__(self) -> Iterator[Attribute]:
        return iter(self.attributes)

    def __getitem__(self, name: str) -> Attribute:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def record_fields(self) -> list[tuple[str, str]]:
        """(name, dtype) pairs appended to the snapshot item record, in table order."""
        return [(a.name, a.dtype) for a in self.attributes]

    def defaults(self) -> dict[str, float]:
        return {a.name: a.default for a in self.attributes}

    def dtypes(self) -> dict[str, np.dtype[Any]]:
        return {a.name: np.dtype(a.dtype) for a in self.attributes}

    def names_where(self, **flags: bool | str) -> tuple[str, ...]:
        """Names of the attributes whose fields equal ``flags``, e.g. ``formula=True``."""
        return tuple(
            a.name for a in self.attributes if all(getattr(a, k) == v for k, v in flags.items())
        )

    @property
    def formula_names(self) -> tuple[str, ...]:
        return self.names_where(formula=True)

    @property
    def overridable(self) -> tuple[str, ...]:
        return self.names_where(override=True)

    @property
    def rule_fields(self) -> tuple[str, ...]:
        return self.names_where(rule=True)

    @property
    def integer_rule_fields(self) -> tuple[str, ...]:
        """What diversity may group by and ``within_days`` may test: integer columns."""
        return tuple(a.name for a in self.attributes if a.rule and a.is_integer)

    @property
    def codes(self) -> tuple[str, ...]:
        return self.names_where(kind="code")

    def fingerprint(self) -> str:
        """Checksum of the record layout (names, dtypes, order): pinned per snapshot format."""
        text = ";".join(f"{n}:{np.dtype(t).str}" for n, t in self.record_fields())
        return hashlib.sha256(text.encode()).hexdigest()[:16]


ITEM_ATTRIBUTES = AttributeTable(
    (
        Attribute("category", "<i4", -1, kind="code", logged=True),
        Attribute("brand", "<i4", -1, kind="code", logged=True),
        Attribute("price", "<f4", 0.0, formula=True, override=True, logged=True, minimum=0.0),
        Attribute("promoted", "u1", 0, kind="flag", formula=True, override=True, logged=True),
        Attribute("first_seen_day", "<i4", -1, kind="day"),
        Attribute("quality", "<f4", 1.0, formula=True, override=True, logged=True, minimum=0.0),
        # < 0: the scene's default cap applies
        Attribute("exposure_cap", "<i4", -1),
    )
)
