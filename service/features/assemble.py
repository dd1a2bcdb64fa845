"""Model inputs from snapshot records: the pure core of the feature stage.

A request has one user record, N item records and a few request-level context values. The
model wants two matrices in ``spec.json`` column order: ``sparse (N, S) int64`` and ``dense
(N, D) float32``. :class:`Assembler` works out once per spec which column each source fills,
then a request is a handful of column-block assignments (user values broadcast over the rows,
item values row by row, context values encoded per spec and broadcast) with no Python loop over
items.

Request-time item attributes (a price the caller knows better than the snapshot) are applied to
the item *records* with :meth:`Assembler.override_items`, before assembly: the record carries
both the model's normalised input and the raw attribute the fusion and the rules read, so one
override keeps the two consistent.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from mtrank.attributes import ITEM_ATTRIBUTES
from mtrank.spec import DenseField, FeatureSpec, Source

# Raw item attributes a request may override (never codes: a caller cannot know the snapshot's
# code tables).
_ATTRIBUTE_NAMES = ITEM_ATTRIBUTES.overridable
_SOURCES: tuple[Source, ...] = ("user", "item", "context")


class OverrideError(ValueError):
    """A request override that names no overridable item value, or has the wrong length."""


class Assembler:
    """Turns (user record, item records, context) into the model's input matrices.

    Args:
        spec: the model's feature spec; records must be ``mtrank.snapshot`` records for it.
    """

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self.n_sparse, self.n_dense = len(spec.sparse), len(spec.dense)
        # Column positions per source, in the order the records store their values.
        self._sparse_pos = {s: np.array(spec.sparse_positions(s), dtype=np.intp) for s in _SOURCES}
        self._dense_pos = {s: np.array(spec.dense_positions(s), dtype=np.intp) for s in _SOURCES}
        self._default_context = spec.default_entity("context")
        item_dense = spec.fields("item")[1]
        self._item_dense: dict[str, tuple[int, DenseField]] = {
            f.name: (j, f) for j, f in enumerate(item_dense)
        }

    @property
    def overridable(self) -> tuple[str, ...]:
        """Item values a request may override: item dense features and raw item attributes."""
        return tuple(dict.fromkeys([*self._item_dense, *_ATTRIBUTE_NAMES]))

    def encode_context(self, context: Mapping[str, object] | None) -> tuple[np.ndarray, np.ndarray]:
        """(sparse (Sc,) int64, dense (Dc,) float32) of the request context; missing -> default."""
        if not context:
            return self._default_context
        return self.spec.encode_entity("context", context)

    def assemble(
        self,
        user_rec: np.ndarray,
        item_recs: np.ndarray,
        context: Mapping[str, object] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Model inputs for one request: (sparse (N, S) int64, dense (N, D) float32).

        ``user_rec`` is one user record, ``item_recs`` an (N,) array of item records (defaults
        for misses, as the stores return them).
        """
        n = len(item_recs)
        ctx_sparse, ctx_dense = self.encode_context(context)
        sparse = np.empty((n, self.n_sparse), dtype=np.int64)  # (N, S)
        dense = np.empty((n, self.n_dense), dtype=np.float32)  # (N, D)
        sparse[:, self._sparse_pos["user"]] = user_rec["sparse"]  # (Su,) -> (N, Su)
        sparse[:, self._sparse_pos["item"]] = item_recs["sparse"]  # (N, Si)
        sparse[:, self._sparse_pos["context"]] = ctx_sparse  # (Sc,) -> (N, Sc)
        dense[:, self._dense_pos["user"]] = user_rec["dense"]  # (Du,) -> (N, Du)
        dense[:, self._dense_pos["item"]] = item_recs["dense"]  # (N, Di)
        dense[:, self._dense_pos["context"]] = ctx_dense  # (Dc,) -> (N, Dc)
        return sparse, dense

    def override_items(
        self, item_recs: np.ndarray, overrides: Mapping[str, npt.ArrayLike]
    ) -> np.ndarray:
        """A copy of ``item_recs`` with request-time values applied; the input is not modified.

        ``overrides`` maps a name in :attr:`overridable` to raw values, (N,) or a scalar for all
        items; NaN (any non-finite value) keeps the stored value of that
        item. A name that is an item dense feature
        gets its normalised model input replaced (per the spec: log1p, mean, std); a name that
        is an item attribute (``price``, ``quality``, ...) gets its raw value replaced. A name
        that is both (``price`` as a model feature) changes both.
        """
        out = item_recs.copy()
        n = len(out)
        for name, raw in overrides.items():
            if name not in self._item_dense and name not in _ATTRIBUTE_NAMES:
                raise OverrideError(
                    f"cannot override {name!r}: overridable item values are "
                    f"{list(self.overridable)}"
                )
            values = _as_values(name, raw, n)  # (N,) float64
            keep = ~np.isfinite(values)  # (N,) NaN = keep the stored value
            if name in self._item_dense:
                j, field = self._item_dense[name]
                column = out["dense"][:, j]  # (N,) view into the copy
                out["dense"][:, j] = np.where(keep, column, field.normalise(values))
            if name in _ATTRIBUTE_NAMES:
                stored = out[name]  # (N,)
                if not np.issubdtype(stored.dtype, np.floating):
                    values = np.where(keep, 0.0, np.round(values))
                out[name] = np.where(keep, stored, values).astype(stored.dtype)
        return out


def _as_values(name: str, raw: npt.ArrayLike, n: int) -> np.ndarray:
    try:
        values = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise OverrideError(f"override {name!r} is not numeric: {e}") from e
    if values.ndim == 0:
        return np.full(n, float(values))  # (N,)
    if values.shape != (n,):
        raise OverrideError(f"override {name!r} has {values.shape} values for {n} items")
    return values
