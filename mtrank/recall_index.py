"""The on-disk layout of the recall stage's approximate-nearest-neighbour index.

Training builds the index from the exported item embeddings (``training/recall/index_build.py``);
the service loads and queries it (``service/recall/index.py``). The two never import each other,
so this module is the whole of what they share: the file names and the metadata model. Layout::

    INDEX_DIR/index.faiss     the faiss index over the items' vectors; label j is the j-th item
    INDEX_DIR/item_ids.npy    int64 [count]: the raw item id of label j (unique, >= 0)
    INDEX_DIR/index.json      IndexMetadata: format, library, metric, dim, count, build
                              parameters, sha256 of both files above, creation time

The export's row 0 (the OOV/padding vector) and every row whose raw id is -1 (not an item) are
never indexed, so labels are *not* embedding rows: the service maps labels to raw ids through
``item_ids.npy`` and nothing else. ``index.json`` is written last, and the directory is
assembled under a temporary name and renamed into place, so a reader sees all of it or none.

Why faiss, and the measurements behind the defaults: ``docs/recall_index.md``.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

INDEX_FORMAT: Final = 1  # bump when the layout or the meaning of a field changes
INDEX_FILE = "index.faiss"
ITEM_IDS_FILE = "item_ids.npy"
METADATA_FILE = "index.json"
LIBRARY: Final = "faiss"
NOT_AN_ITEM = -1  # raw id the export writes for rows that are not items (row 0 is always one)

# "ip" serves both of mtrank.recall_spec's similarities: "dot" as is, "cosine" because its
# vectors are exported at unit length. "l2" is for models trained with Euclidean distance.
Metric = Literal["ip", "l2"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FlatParams(_Frozen):
    """Exact search: every query scans every vector (right for catalogues up to ~100k items)."""

    kind: Literal["flat"] = "flat"


class HnswParams(_Frozen):
    """A faiss HNSW graph over the full vectors (``IndexHNSWFlat``). The defaults are the build
    measured at 1M items in docs/recall_index.md: recall@100 0.996 at p50 0.82 ms there (target
    0.95 / 1 ms). ef_construction=40 stalled at 0.948-0.955 whatever the beam."""

    kind: Literal["hnsw"] = "hnsw"
    M: int = Field(32, ge=4, le=128, description="graph neighbours per node (memory, recall)")
    ef_construction: int = Field(100, ge=8, description="beam width while building (build time)")
    ef_search: int = Field(
        256, ge=1, description="default beam width per query; widened for k and exclusions"
    )


IndexParams = Annotated[FlatParams | HnswParams, Field(discriminator="kind")]


class IndexMetadata(_Frozen):
    """``index.json``: what was built, from what, with what, and the checksums to verify it."""

    format: Literal[1] = INDEX_FORMAT
    library: Literal["faiss"] = LIBRARY
    library_version: str = Field(description="faiss.__version__ of the build")
    metric: Metric
    dim: int = Field(ge=1, description="vector width; the user tower's output must match")
    count: int = Field(ge=0, description="items indexed = rows of item_ids.npy")
    params: IndexParams
    index_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    item_ids_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    source_rows: int = Field(ge=1, description="rows of the embedding matrix, row 0 included")
    created_at: str = Field(description="UTC, ISO 8601")
