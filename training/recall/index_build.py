"""Build the recall stage's ANN index from exported item embeddings (layout: mtrank.recall_index).

    index dir <- build_index(item_embeddings.npy, item_ids.npy)   (training/recall/export.py)

Row 0 of the embedding matrix is the OOV/padding vector and rows whose raw id is -1 are not items
(the export's convention); neither is ever indexed. The directory is assembled in a hidden
sibling and renamed into place, with ``index.json`` (checksums included) written last, so the
service never loads half an index.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np

from mtrank.recall_index import (
    INDEX_FILE,
    ITEM_IDS_FILE,
    METADATA_FILE,
    NOT_AN_ITEM,
    HnswParams,
    IndexMetadata,
    IndexParams,
    Metric,
)
from mtrank.registry import sha256_file

_FAISS_METRIC = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


class IndexBuildError(ValueError):
    """The embeddings or ids cannot make a valid index (the message names the problem)."""


def indexable_rows(item_embeddings: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    """Row numbers to index: every row but 0 whose raw id is not NOT_AN_ITEM (checked)."""
    if item_embeddings.ndim != 2 or item_embeddings.shape[1] < 1:
        raise IndexBuildError(f"item_embeddings must be (n + 1, d), got {item_embeddings.shape}")
    if item_embeddings.dtype != np.float32:
        raise IndexBuildError(f"item_embeddings must be float32, got {item_embeddings.dtype}")
    if item_ids.shape != (item_embeddings.shape[0],) or item_ids.dtype != np.int64:
        raise IndexBuildError(
            f"item_ids must be int64 ({item_embeddings.shape[0]},) to match the embeddings, "
            f"got {item_ids.dtype} {item_ids.shape}"
        )
    rows: np.ndarray = np.flatnonzero(item_ids != NOT_AN_ITEM)
    rows = rows[rows != 0]  # row 0 is OOV/padding whatever id it carries
    ids = item_ids[rows]
    if (ids < 0).any():
        raise IndexBuildError(f"raw item ids must be >= 0 (or {NOT_AN_ITEM} for non-items)")
    if len(np.unique(ids)) != len(ids):
        raise IndexBuildError("raw item ids of the indexed rows must be unique")
    if not np.isfinite(item_embeddings[rows]).all():
        raise IndexBuildError("item_embeddings hold NaN or infinite values")
    return rows


def make_index(vectors: np.ndarray, metric: Metric, params: IndexParams) -> faiss.Index:
    """A faiss index holding ``vectors`` (count, d) under labels 0..count-1."""
    d = vectors.shape[1]
    index: faiss.Index
    if isinstance(params, HnswParams):
        hnsw = faiss.IndexHNSWFlat(d, params.M, _FAISS_METRIC[metric])
        hnsw.hnsw.efConstruction = params.ef_construction
        hnsw.hnsw.efSearch = params.ef_search
        index = hnsw
    else:
        index = faiss.IndexFlat(d, _FAISS_METRIC[metric])
    index.add(vectors)
    return index


def build_index(
    item_embeddings: np.ndarray,
    item_ids: np.ndarray,
    out_dir: Path | str,
    metric: Metric = "ip",
    params: IndexParams | None = None,
    threads: int | None = None,
) -> IndexMetadata:
    """Index every item row of ``item_embeddings`` into a new directory ``out_dir``.

    Args:
        item_embeddings: float32 (n + 1, d); row i is item vocabulary row i, row 0 is OOV.
        item_ids: int64 (n + 1,); raw id of each row, NOT_AN_ITEM (-1) for rows to skip.
        out_dir: must not exist yet (indexes are versioned directories, never edited).
        metric: "ip" (dot and cosine models) or "l2".
        params: FlatParams (exact) or HnswParams (default).
        threads: OpenMP threads for the build (default: faiss's, i.e. every core).

    Returns the metadata written to ``index.json``.
    """
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists: build each index into a new directory")
    params = params if params is not None else HnswParams()
    rows = indexable_rows(item_embeddings, item_ids)
    vectors = np.ascontiguousarray(item_embeddings[rows])  # (count, d)
    ids = np.ascontiguousarray(item_ids[rows])  # (count,): label j -> raw id
    if threads is not None:
        faiss.omp_set_num_threads(threads)
    index = make_index(vectors, metric, params)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        faiss.write_index(index, str(staging / INDEX_FILE))
        np.save(staging / ITEM_IDS_FILE, ids)
        meta = IndexMetadata(
            library_version=faiss.__version__,
            metric=metric,
            dim=vectors.shape[1],
            count=len(ids),
            params=params,
            index_sha256=sha256_file(staging / INDEX_FILE),
            item_ids_sha256=sha256_file(staging / ITEM_IDS_FILE),
            source_rows=item_embeddings.shape[0],
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        (staging / METADATA_FILE).write_text(meta.model_dump_json(indent=1) + "\n")
        os.replace(staging, out)  # atomic on one filesystem
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return meta
