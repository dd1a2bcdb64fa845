"""build_index: what it indexes (never row 0 or non-items), what it writes, and that it writes it
all or nothing."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from mtrank.recall_index import (
    INDEX_FILE,
    ITEM_IDS_FILE,
    METADATA_FILE,
    NOT_AN_ITEM,
    FlatParams,
    HnswParams,
    IndexMetadata,
)
from mtrank.registry import sha256_file
from training.recall import index_build
from training.recall.index_build import IndexBuildError, build_index

D = 8


def export_like(n_items: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (n + 1, D) float32, ids (n + 1,) int64) as training/recall/export.py writes
    them: row 0 is OOV (id -1), raw ids are arbitrary unique int64."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n_items + 1, D)).astype(np.float32)
    ids = np.concatenate([[NOT_AN_ITEM], rng.choice(10**9, n_items, replace=False)])
    return emb, ids.astype(np.int64)


def stored_vectors(out: Path) -> np.ndarray:
    index = faiss.read_index(str(out / INDEX_FILE))
    flat = faiss.downcast_index(index.storage) if isinstance(index, faiss.IndexHNSWFlat) else index
    return flat.reconstruct_n(0, flat.ntotal)


@pytest.mark.parametrize("params", [FlatParams(), HnswParams(M=8, ef_construction=32)])
def test_label_j_holds_the_jth_item_row_and_its_raw_id(
    tmp_path: Path, params: FlatParams | HnswParams
) -> None:
    emb, ids = export_like(50)
    ids[[7, 20]] = NOT_AN_ITEM  # cold rows of an id-only model: not items
    meta = build_index(emb, ids, tmp_path / "idx", params=params)
    rows = [r for r in range(1, 51) if r not in (7, 20)]
    np.testing.assert_array_equal(np.load(tmp_path / "idx" / ITEM_IDS_FILE), ids[rows])
    np.testing.assert_array_equal(stored_vectors(tmp_path / "idx"), emb[rows])
    assert (meta.count, meta.dim, meta.source_rows, meta.params) == (48, D, 51, params)


def test_row_zero_is_never_indexed_even_with_a_real_looking_id(tmp_path: Path) -> None:
    emb, ids = export_like(10)
    ids[0] = 123  # whatever the export puts there, row 0 is OOV/padding
    build_index(emb, ids, tmp_path / "idx", params=FlatParams())
    assert 123 not in np.load(tmp_path / "idx" / ITEM_IDS_FILE)
    assert not (stored_vectors(tmp_path / "idx") == emb[0]).all(axis=1).any()


def test_metadata_pins_both_files_by_sha256(tmp_path: Path) -> None:
    emb, ids = export_like(30)
    meta = build_index(emb, ids, tmp_path / "idx", metric="l2")
    out = tmp_path / "idx"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [INDEX_FILE, ITEM_IDS_FILE, METADATA_FILE]
    )
    on_disk = IndexMetadata.model_validate_json((out / METADATA_FILE).read_text())
    assert on_disk == meta
    assert meta.index_sha256 == sha256_file(out / INDEX_FILE)
    assert meta.item_ids_sha256 == sha256_file(out / ITEM_IDS_FILE)
    assert (meta.library, meta.library_version, meta.metric) == ("faiss", faiss.__version__, "l2")
    assert json.loads((out / METADATA_FILE).read_text())["params"]["kind"] == "hnsw"


def test_an_existing_directory_is_never_overwritten(tmp_path: Path) -> None:
    emb, ids = export_like(5)
    (tmp_path / "idx").mkdir()
    with pytest.raises(FileExistsError, match="new directory"):
        build_index(emb, ids, tmp_path / "idx")
    assert list((tmp_path / "idx").iterdir()) == []


def test_a_failed_write_leaves_no_directory_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index_build.np, "save", disk_full)
    emb, ids = export_like(5)
    with pytest.raises(OSError, match="No space"):
        build_index(emb, ids, tmp_path / "idx")
    assert list(tmp_path.iterdir()) == []  # neither the index nor its staging sibling


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e, i: (e.astype(np.float64), i), "float32"),
        (lambda e, i: (e[:, 0], i), r"\(n \+ 1, d\)"),
        (lambda e, i: (e, i[:-1]), "to match"),
        (lambda e, i: (e, i.astype(np.int32)), "int64"),
        (lambda e, i: (e, np.where(np.arange(len(i)) == 3, i[2], i)), "unique"),
        (lambda e, i: (e, np.where(np.arange(len(i)) == 3, -5, i)), ">= 0"),
        (lambda e, i: (np.where(np.arange(len(e))[:, None] == 2, np.nan, e), i), "NaN"),
    ],
    ids=["float64", "1-d", "short ids", "int32 ids", "duplicate id", "negative id", "NaN"],
)
def test_bad_inputs_are_refused_before_anything_is_written(
    tmp_path: Path, change: object, message: str
) -> None:
    emb, ids = export_like(10)
    bad_emb, bad_ids = change(emb, ids)  # type: ignore[operator]
    with pytest.raises(IndexBuildError, match=message):
        build_index(bad_emb.astype(bad_emb.dtype), bad_ids, tmp_path / "idx")
    assert list(tmp_path.iterdir()) == []


def test_nan_in_row_zero_or_a_skipped_row_does_not_matter(tmp_path: Path) -> None:
    emb, ids = export_like(10)
    emb[0] = np.nan
    ids[4] = NOT_AN_ITEM
    emb[4] = np.nan
    assert build_index(emb, ids, tmp_path / "idx", params=FlatParams()).count == 9


def test_auto_builds_flat_up_to_the_measured_crossover_and_hnsw_above() -> None:
    from training.recall.publish import AUTO_FLAT_MAX_ITEMS, choose_index

    assert choose_index("auto", AUTO_FLAT_MAX_ITEMS).kind == "flat"
    assert choose_index("auto", AUTO_FLAT_MAX_ITEMS + 1).kind == "hnsw"
    assert choose_index("hnsw", 10).kind == "hnsw"  # an explicit choice is kept
    assert choose_index("flat", 10 * AUTO_FLAT_MAX_ITEMS).kind == "flat"
