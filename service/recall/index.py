"""The recall index, loaded and queried: user vectors -> top-k raw item ids, filters held exactly.

Layout and metadata: :mod:`mtrank.recall_index` (written by ``training/recall/index_build.py``).

**Loading** verifies everything before returning: ``index.json`` against its model, both files'
sha256, the id table (int64, unique, one per indexed vector), and the faiss index's dimension,
count, metric and type against the metadata (and the user tower's dimension when the caller
passes it). Any failure raises :class:`service.errors.RecallIndexInvalid` naming the file, and
nothing is swapped: the caller keeps serving the index it already holds.

**Filters** (items the user has seen, a category allow-list) are faiss ``IDSelector`` objects
passed with an HNSW query, so the graph search itself skips them, and every result is checked
again afterwards; a flat (exact) index is scanned with numpy instead, the filters as masks. A
row that comes back short of ``min(k, items the filters allow)`` (a graph search can
miss allowed items when the filters remove most of its neighbourhood) is answered by an exact scan
of the allowed items instead, as is every row whose allow-list keeps under ``EXACT_BELOW`` of the
catalogue. Hence: never an excluded or disallowed item, and fewer than k only when the catalogue
allowed by the filters has fewer than k items.

**Threads.** A :class:`RecallIndex` is immutable once built: ``with_categories`` returns a new
one, per-query settings travel in faiss ``SearchParameters`` (never by setting ``efSearch`` on the
shared index), and faiss searches are const and release the GIL, so any number of threads may
call :meth:`RecallIndex.search` on one instance at once, and a reload swaps the reference. Each
call pins OpenMP on the calling thread to ``threads`` (default 1), so concurrent requests do not
each start a full OpenMP team on a small machine.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np
from pydantic import ValidationError

from mtrank.recall_index import (
    INDEX_FILE,
    ITEM_IDS_FILE,
    METADATA_FILE,
    FlatParams,
    HnswParams,
    IndexMetadata,
)
from mtrank.registry import sha256_file
from service.errors import RecallIndexInvalid

PAD_ID = -1  # raw id in the padding of a row that has fewer than k results
EXACT_BELOW = 0.05  # allow-lists keeping under this share of the catalogue are scanned exactly
# With an exclusion list the beam is widened to k + |excluded| (the excluded items still take
# beam slots), but never past this many times the unfiltered beam: a user who has seen 10,000
# items must not cost a 10,000-wide search. A short answer is still completed exactly.
EF_WIDEN_MAX = 4
# Allow-lists cached (bitmaps, and row copies of those under EXACT_BELOW: at most 16 x 5% of the
# vectors, 0.8 x the index's own vector memory in the worst case). Scenes reuse a handful.
_CACHED_ALLOW_LISTS = 16

_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}

ExcludeIds = Collection[int] | np.ndarray


@dataclass(frozen=True)
class _Allowed:
    """One allow-list over the labels: a bool mask and the packed bitmap faiss reads."""

    mask: np.ndarray  # (count,) bool
    bitmap: np.ndarray  # (ceil(count / 8),) uint8, bit j (little-endian) = label j allowed
    labels: np.ndarray  # (count_allowed,) int64, sorted
    count: int
    vectors: np.ndarray | None  # (count_allowed, dim) copy, kept only for scanned allow-lists


def _fail(path: Path, problem: str, cause: BaseException | None = None) -> RecallIndexInvalid:
    err = RecallIndexInvalid(f"recall index {path}: {problem}", field=str(path))
    err.__cause__ = cause
    return err


def _read_metadata(directory: Path) -> IndexMetadata:
    path = directory / METADATA_FILE
    try:
        return IndexMetadata.model_validate_json(path.read_bytes())
    except OSError as e:
        raise _fail(path, f"cannot read ({e.strerror or e})", e) from e
    except (ValidationError, json.JSONDecodeError) as e:
        raise _fail(path, f"invalid metadata: {e}", e) from e


def _check_checksum(path: Path, want: str) -> None:
    try:
        got = sha256_file(path)
    except OSError as e:
        raise _fail(path, f"cannot read ({e.strerror or e})", e) from e
    if got != want:
        raise _fail(path, f"sha256 {got} does not match index.json ({want}): corrupt or replaced")


def _read_item_ids(path: Path, count: int) -> np.ndarray:
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise _fail(path, f"not a readable .npy file ({e})", e) from e
    if ids.dtype != np.int64 or ids.shape != (count,):
        raise _fail(path, f"must be int64 ({count},) per index.json, got {ids.dtype} {ids.shape}")
    if (ids < 0).any() or len(np.unique(ids)) != count:
        raise _fail(path, "raw item ids must be unique and >= 0")
    return np.asarray(ids)


def _read_faiss(path: Path, meta: IndexMetadata) -> Any:
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise _fail(path, f"faiss cannot read it ({e})", e) from e
    want_type = faiss.IndexHNSWFlat if isinstance(meta.params, HnswParams) else faiss.IndexFlat
    problems = [
        f"{name} {got} != {want} in index.json"
        for name, got, want in (
            ("dim", index.d, meta.dim),
            ("count", index.ntotal, meta.count),
            ("metric", index.metric_type, _METRICS[meta.metric]),
        )
        if got != want
    ]
    if not isinstance(index, want_type):
        problems.append(f"type {type(index).__name__} != {meta.params.kind} in index.json")
    if problems:
        raise _fail(path, "; ".join(problems))
    return index


class RecallIndex:
    """A loaded recall index (use :meth:`load`); immutable and safe to share between threads.

    Args:
        meta: the verified ``index.json``.
        index: the faiss index; label j is the item ``item_ids[j]``.
        item_ids: int64 (count,), unique raw ids by label.
        categories: int64 (count,) category code by label, or None (then no allow-lists).
        threads: OpenMP threads per search call.
    """

    def __init__(
        self,
        meta: IndexMetadata,
        index: Any,
        item_ids: np.ndarray,
        categories: np.ndarray | None = None,
        threads: int = 1,
    ) -> None:
        self.metadata = meta
        self.item_ids = item_ids
        self.categories = categories
        self.threads = threads
        self._index = index
        # an exact scan reads the same vectors: HNSW keeps them in its flat storage
        flat = faiss.downcast_index(index.storage) if meta.params.kind == "hnsw" else index
        self._flat: Any = flat
        # (count, dim) float32 view of those vectors, no copy: a restrictive allow-list is
        # scanned with numpy over its own rows (faiss's flat scan with a selector visits all)
        self._vectors = np.empty((0, meta.dim), dtype=np.float32)
        if meta.count:
            xb = cast(Any, flat).get_xb()  # missing from faiss's stub for the base class
            self._vectors = faiss.rev_swig_ptr(xb, meta.count * meta.dim).reshape(-1, meta.dim)
        self._order = np.argsort(item_ids, kind="stable")  # raw id -> label by binary search
        self._sorted_ids = item_ids[self._order]
        self._allowed: dict[frozenset[int], _Allowed] = {}
        self._allowed_lock = threading.Lock()
        self._pad_score = np.float32(-np.inf if meta.metric == "ip" else np.inf)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls, directory: Path | str, *, expected_dim: int | None = None, threads: int = 1
    ) -> RecallIndex:
        """Load and verify an index directory; raises RecallIndexInvalid on any defect.

        ``expected_dim`` is the user tower's output width: a mismatch is refused here, at load,
        rather than discovered at the first query.
        """
        root = Path(directory)
        meta = _read_metadata(root)
        if expected_dim is not None and meta.dim != expected_dim:
            raise _fail(root / METADATA_FILE, f"dim {meta.dim} != the user vectors' {expected_dim}")
        _check_checksum(root / INDEX_FILE, meta.index_sha256)
        _check_checksum(root / ITEM_IDS_FILE, meta.item_ids_sha256)
        item_ids = _read_item_ids(root / ITEM_IDS_FILE, meta.count)
        index = _read_faiss(root / INDEX_FILE, meta)
        return cls(meta, index, item_ids, threads=threads)

    def with_categories(self, raw_ids: np.ndarray, categories: np.ndarray) -> RecallIndex:
        """A copy that can filter by category; items absent from ``raw_ids`` get category -1."""
        raw_ids = np.asarray(raw_ids, dtype=np.int64)
        categories = np.asarray(categories, dtype=np.int64)
        if raw_ids.shape != categories.shape or raw_ids.ndim != 1:
            raise ValueError(f"raw_ids {raw_ids.shape} and categories {categories.shape} differ")
        by_label = np.full(self.count, -1, dtype=np.int64)
        labels, found = self._labels(raw_ids)
        by_label[labels] = categories[found]
        return RecallIndex(self.metadata, self._index, self.item_ids, by_label, self.threads)

    @property
    def count(self) -> int:
        return self.metadata.count

    @property
    def dim(self) -> int:
        return self.metadata.dim

    # ------------------------------------------------------------------ searching
    def search(
        self,
        user_vectors: np.ndarray,
        k: int,
        *,
        exclude: Sequence[ExcludeIds] | None = None,
        allow_categories: Collection[int] | None = None,
        ef_search: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items per user vector under the filters.

        Args:
            user_vectors: float32 (B, dim).
            k: items per row (>= 1).
            exclude: None or B collections of raw item ids never to return (ids the index does
                not hold are ignored).
            allow_categories: None, or the category codes allowed (needs ``with_categories``).
            ef_search: HNSW beam width (default: index.json's); widened for exclusion lists.

        Returns (ids int64 (B, k), scores float32 (B, k)), best first: the inner product for
        metric "ip", the squared distance for "l2". A row with fewer than k results is padded
        with PAD_ID and a score of -inf ("ip") or +inf ("l2").
        """
        q = self._check_queries(user_vectors, k)
        if exclude is not None and len(exclude) != len(q):
            raise ValueError(f"exclude has {len(exclude)} rows for {len(q)} user vectors")
        allowed = self._allow_list(allow_categories)
        ef = ef_search or self._default_ef()
        ids = np.full((len(q), k), PAD_ID, dtype=np.int64)  # (B, k)
        scores = np.full((len(q), k), self._pad_score, dtype=np.float32)  # (B, k)
        faiss.omp_set_num_threads(self.threads)  # this thread's OpenMP team, per call
        if exclude is None and allowed is None:
            labels, dist = self._graph(q, k, ef, None)  # one batched call, (B, k) each
            for r in range(len(q)):
                if (labels[r] >= 0).sum() < min(k, self.count):  # graph fell short: scan
                    labels[r], dist[r] = self._exact(q[r : r + 1], k, None)
                self._fill(ids, scores, r, labels[r], dist[r])
            return ids, scores
        for r in range(len(q)):
            excluded = self._excluded_labels(exclude[r] if exclude is not None else ())
            labels, dist = self._search_filtered(q[r : r + 1], k, ef, excluded, allowed)
            self._fill(ids, scores, r, labels, dist)
        return ids, scores

    def _excluded_labels(self, raw_ids: ExcludeIds) -> np.ndarray:
        """Sorted unique int64 labels of the raw ids (the buffer IDSelectorBatch reads)."""
        raw = np.asarray(raw_ids if isinstance(raw_ids, np.ndarray) else list(raw_ids))
        return np.unique(self._labels(raw.astype(np.int64, copy=False).ravel())[0])

    def _check_queries(self, user_vectors: np.ndarray, k: int) -> np.ndarray:
        q = np.ascontiguousarray(user_vectors, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"user_vectors must be (B, {self.dim}), got {q.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not np.isfinite(q).all():
            raise ValueError("user_vectors hold NaN or infinite values")
        return q

    def _default_ef(self) -> int:
        params = self.metadata.params
        return params.ef_search if isinstance(params, HnswParams) else 0

    def _search_filtered(
        self, q: np.ndarray, k: int, ef: int, excluded: np.ndarray, allowed: _Allowed | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """One row under its filters -> (labels, scores), only valid results, best first."""
        n_allowed = self.count if allowed is None else allowed.count
        ex_allowed = excluded if allowed is None else excluded[allowed.mask[excluded]]
        want = min(k, n_allowed - len(ex_allowed))  # what the catalogue can give under filters
        if want <= 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        if allowed is not None and allowed.vectors is not None:
            return self._scan(q[0], allowed.labels, excluded, k, allowed.vectors)
        if isinstance(self.metadata.params, FlatParams):
            return self._scan_all(q[0], excluded, allowed, k)
        sel = self._selector(excluded, allowed)
        wide = min(k + len(excluded), EF_WIDEN_MAX * max(ef, k))
        labels, dist = self._graph(q, k, max(ef, wide), sel)
        labels, dist = self._valid(labels[0], dist[0], excluded, allowed)
        if len(labels) < want:  # the graph missed allowed items: scan them exactly
            if allowed is not None:
                return self._scan(q[0], allowed.labels, excluded, k, allowed.vectors)
            labels, dist = self._exact(q, k, sel)
            labels, dist = self._valid(labels[0], dist[0], excluded, allowed)
        return labels, dist

    def _scan(
        self,
        q: np.ndarray,
        labels: np.ndarray,
        excluded: np.ndarray,
        k: int,
        vectors: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k among ``labels`` but ``excluded`` -> (labels, scores).

        ``vectors`` are the rows of ``labels`` when the caller has them (a cached allow-list).
        """
        if vectors is None:
            vectors = self._vectors[labels]  # (m, dim) gathered
        if self.metadata.metric == "ip":
            key = -(vectors @ q)  # (m,): smaller is better
        else:
            key = ((vectors - q) ** 2).sum(axis=1)  # (m,)
        if len(excluded):
            key[np.isin(labels, excluded, assume_unique=True)] = np.inf
        n_ok = int(np.isfinite(key).sum())
        top = np.argpartition(key, k - 1)[:k] if len(key) > k else np.arange(len(key))
        top = top[np.argsort(key[top], kind="stable")][: min(k, n_ok)]
        scores = -key[top] if self.metadata.metric == "ip" else key[top]
        return labels[top], scores.astype(np.float32)

    def _scan_all(
        self, q: np.ndarray, excluded: np.ndarray, allowed: _Allowed | None, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over every vector, the filters as masks -> (labels, scores).

        A flat index's filtered query: one matrix-vector product over the contiguous vectors,
        excluded and disallowed rows set to +inf, then a partial sort. faiss's flat search with
        an ``IDSelector`` costs the same scan plus a selector call per vector and a k-heap;
        measured 1.1-1.5x faster at 2.5k-100k items, k=500 (docs/recall_index.md).
        """
        if self.metadata.metric == "ip":
            key = -(self._vectors @ q)  # (count,): smaller is better
        else:
            key = ((self._vectors - q) ** 2).sum(axis=1)  # (count,)
        key[excluded] = np.inf
        if allowed is not None:
            key[~allowed.mask] = np.inf
        n_ok = self.count - int(np.isinf(key).sum())
        top = np.argpartition(key, k - 1)[:k] if self.count > k else np.arange(self.count)
        top = top[np.argsort(key[top], kind="stable")][: min(k, n_ok)]
        scores = -key[top] if self.metadata.metric == "ip" else key[top]
        return top.astype(np.int64), scores.astype(np.float32)

    def _graph(
        self, q: np.ndarray, k: int, ef: int, sel: faiss.IDSelector | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(self.metadata.params, FlatParams):
            return self._exact(q, k, sel)
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # not in faiss's stub
        params.efSearch = max(ef, k)
        params.sel = sel
        dist, labels = self._index.search(q, k, params=params)
        return np.asarray(labels), np.asarray(dist)

    def _exact(
        self, q: np.ndarray, k: int, sel: faiss.IDSelector | None
    ) -> tuple[np.ndarray, np.ndarray]:
        params = faiss.SearchParameters()
        params.sel = sel
        dist, labels = self._flat.search(q, k, params=params)
        return np.asarray(labels), np.asarray(dist)

    @staticmethod
    def _selector(excluded: np.ndarray, allowed: _Allowed | None) -> faiss.IDSelector | None:
        """The faiss selector of labels that are allowed and not excluded (None: every label).

        The bitmap is read in place (the cached allow-list owns it and outlives the search); the
        batch is copied into a hash set; faiss's wrappers keep sub-selectors alive with the
        selector that combines them.
        """
        sel: faiss.IDSelector | None = None
        if allowed is not None:  # n is the bitmap's size in bytes
            sel = faiss.IDSelectorBitmap(len(allowed.bitmap), faiss.swig_ptr(allowed.bitmap))
        if len(excluded):
            not_excluded = faiss.IDSelectorNot(faiss.IDSelectorBatch(excluded))
            sel = not_excluded if sel is None else faiss.IDSelectorAnd(sel, not_excluded)
        return sel

    @staticmethod
    def _valid(
        labels: np.ndarray, dist: np.ndarray, excluded: np.ndarray, allowed: _Allowed | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Drop padding, excluded and disallowed labels (the selectors should have already)."""
        ok = labels >= 0
        ok[ok] &= ~np.isin(labels[ok], excluded)
        if allowed is not None:
            ok[ok] &= allowed.mask[labels[ok]]
        return labels[ok], dist[ok]

    def _fill(
        self, ids: np.ndarray, scores: np.ndarray, r: int, labels: np.ndarray, dist: np.ndarray
    ) -> None:
        n = int((labels >= 0).sum())  # faiss pads with -1 at the end only
        ids[r, :n] = self.item_ids[labels[:n]]
        scores[r, :n] = dist[:n]

    # ------------------------------------------------------------------ id and category maps
    def _labels(self, raw_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels of the raw ids this index holds, their positions in ``raw_ids``)."""
        if len(raw_ids) == 0 or self.count == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        pos = np.searchsorted(self._sorted_ids, raw_ids).clip(0, self.count - 1)
        found = np.flatnonzero(self._sorted_ids[pos] == raw_ids)
        return self._order[pos[found]].astype(np.int64), found

    def _allow_list(self, allow_categories: Collection[int] | None) -> _Allowed | None:
        if allow_categories is None:
            return None
        if self.categories is None:
            raise ValueError("allow_categories needs an index with categories (with_categories)")
        key = frozenset(int(c) for c in allow_categories)
        with self._allowed_lock:
            cached = self._allowed.get(key)
        if cached is not None:
            return cached
        mask = np.isin(self.categories, np.fromiter(key, dtype=np.int64, count=len(key)))
        labels = np.flatnonzero(mask).astype(np.int64)
        # a small allow-list is scanned, not searched: keep its rows contiguous, as gathering
        # them per request costs more than the scan itself
        rows = self._vectors[labels] if len(labels) < EXACT_BELOW * self.count else None
        bitmap = np.packbits(mask, bitorder="little")
        allowed = _Allowed(mask, bitmap, labels, len(labels), rows)
        with self._allowed_lock:  # scenes reuse a handful of allow-lists: keep their bitmaps
            if len(self._allowed) >= _CACHED_ALLOW_LISTS:
                self._allowed.clear()
            self._allowed[key] = allowed
        return allowed
